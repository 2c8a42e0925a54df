"""Console output: the readable end-of-run table (rich). Progress lines: bench.log.

By default the table fits NARROW columns (or a narrower terminal): the identity columns stay
whole and metrics are left out, least important first, until it fits; `wide` shows every metric.
The CSV files hold everything either way.
"""
from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from bench.log import stdout_console
from bench.measure.schema import RESULT_KEY, VALIDITY_METRICS, WORKLOAD_KEYS, point_label, title

NARROW = 100
# Metrics shown with `wide`, in this order; a sweep adds SWEEP_SHOWN.
SHOWN = ["ttft_ms", "prefill_ms", "vision_ms", "tpot_ms", "decode_tok_s", "e2e_ms", "peak_alloc_mb", "weight_mb",
         "token_agree", "kl_mean", "engine_kl_mean"]
SWEEP_SHOWN = ["requests_per_s", "output_tok_s"]
# A served run's (engine `endpoint`: one row per request, a variant per concurrency and rate):
# the client's timings, the server's own TTFT, throughput, and the engine phases our server reports
SERVED_SHOWN = ["ttft_ms", "server_ttft_ms", "tpot_ms", "itl_p99_ms", "e2e_ms", "point_rps", "point_output_tok_s",
                "prefill_ms", "vision_ms"]
FIDELITY_METRICS = ("token_agree", "kl_mean", "engine_kl_mean")
# The narrow table keeps the first metrics of this list that fit (shown in SHOWN's order).
PRIORITY = ["ttft_ms", "tpot_ms", "token_agree", "e2e_ms", "decode_tok_s", "requests_per_s", "point_rps",
            "peak_alloc_mb", "server_ttft_ms", "output_tok_s", "point_output_tok_s", "itl_p99_ms", "prefill_ms",
            "vision_ms", "kl_mean", "weight_mb", "engine_kl_mean"]
# A row of the table per result: its identity (the workload point as one label) and its status.
_IDENTITY = [k for k in RESULT_KEY if k not in WORKLOAD_KEYS]
_SHARED = ("model", "device")  # in the title when every row has the same one, else columns
_STATUS_ORDER = {"ok": 0, "skipped": 1}  # then failed (and anything else)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v != 0 and abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def _results(summary: list[dict]) -> list[tuple[dict, str, str, str | None, dict]]:
    """(identity, point label, status, error, metric -> summary row) per result: ok results first,
    then skipped, then failed, each in the order they ran."""
    keyed: dict[tuple, dict] = {}
    for r in summary:
        ok = r.get("status") == "ok"
        key = (*(r.get(k) for k in _IDENTITY), point_label(r) if ok else "", r.get("run_id"), r.get("status"),
               r.get("error"))
        keyed.setdefault(key, {})[r.get("metric")] = r
    out = [(dict(zip(_IDENTITY, key)), key[-4], key[-2], key[-1], metrics) for key, metrics in keyed.items()]
    return sorted(out, key=lambda result: _STATUS_ORDER.get(result[2], 2))


def _sweep(results) -> bool:
    return len({point for _, point, status, _, _ in results if status == "ok"}) > 1


def _served(summary: list[dict]) -> bool:
    """Whether the results are a served endpoint's, measured as its client (run --endpoint)."""
    return bool(summary) and all(r.get("engine") == "endpoint" for r in summary)


def all_metrics(summary: list[dict]) -> list[str]:
    """The metric columns of the wide table: SHOWN, and SWEEP_SHOWN for a sweep; SERVED_SHOWN for
    a served endpoint's results."""
    if _served(summary):
        return SERVED_SHOWN
    return SHOWN + (SWEEP_SHOWN if _sweep(_results(summary)) else [])


def summary_table(summary: list[dict], weights: str, metrics: list[str] | None = None) -> Table:
    """The table of `summary` (summary.csv rows) with these metric columns (default: all_metrics)."""
    results = _results(summary)
    sweep = _sweep(results)
    metrics = all_metrics(summary) if metrics is None else metrics
    shared = {k: {ident[k] for ident, *_ in results} for k in _SHARED}
    in_title = [k for k in _SHARED if len(shared[k]) == 1 and next(iter(shared[k]))]
    heading = ", ".join(f"{k} {next(iter(shared[k]))}" for k in in_title)
    per = "request" if _served(summary) else "run"
    table = Table(title=f"median per {per}: {heading + ', ' if heading else ''}weights={weights}", box=box.SIMPLE_HEAD,
                  show_edge=False, padding=(0, 1, 0, 0), title_justify="left")  # two spaces between columns
    identity = [k for k in _SHARED if k not in in_title] + ["variant", "engine", "dtype", "cache_state"]
    identity = [k for k in identity if any(ident[k] for ident, *_ in results)]  # a served run has no device, dtype
    for k in identity:
        table.add_column("cache" if k == "cache_state" else k, no_wrap=True)
    if sweep:
        table.add_column("point", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    for m in metrics:
        table.add_column(title(m).replace(" ", "\n", 1), justify="right", no_wrap=True)
    table.add_column("valid", no_wrap=True)
    for ident, point, status, _, values in results:
        cells = [str(ident[k] or "") for k in identity] + ([point if status == "ok" else ""] if sweep else [])
        if status != "ok":
            table.add_row(*cells, "0", *["-"] * len(metrics), f"[yellow]{status}[/]")
            continue
        n = max(m.get("n", 0) for m in values.values())
        valid = _valid(values)
        table.add_row(*cells, str(n), *[_fmt(values.get(k, {}).get("median")) for k in metrics],
                      "yes" if valid else "[red]no[/]")
    return table


def _valid(values: dict) -> bool:
    """Whether a result's summaries of VALIDITY_METRICS are all valid."""
    return all(m.get("valid") for k, m in values.items() if k in VALIDITY_METRICS)


def _invalid_note(summary: list[dict]) -> str | None:
    """What `valid no` means, with the first invalid result's reason (None when every ok result is valid)."""
    for ident, point, status, _, values in _results(summary):
        if status != "ok" or _valid(values):
            continue
        metric, row = next((k, values[k]) for k in VALIDITY_METRICS if k in values and not values[k].get("valid"))
        reason = str(row.get("invalid_reason") or "").split(";")[0]
        names = [title(m).split()[0] for m in VALIDITY_METRICS]
        example = f", e.g. {ident['variant']} {ident['cache_state']} {point} {title(metric).split()[0]}: {reason}"
        flags = "--num-prompts (or --duration) or --max-cv" if _served(summary) else \
            "--num-runs, --min-seconds or --max-cv"
        return (f"valid no: a {' or '.join(names)} summary missed {flags} (why: "
                f"summary.csv invalid_reason{example if reason else ''})")
    return None


def _measured(summary: list[dict]) -> set[str]:
    """The metrics some ok result has a median of (token agree with --no-fidelity has none)."""
    return {r.get("metric") for r in summary if r.get("status") == "ok" and _fmt(r.get("median")) != "-"}


def _width(console: Console, table: Table) -> int:
    return Measurement.get(console, console.options.update(width=10_000), table).maximum


def fitted_table(summary: list[dict], weights: str, console: Console, width: int) -> tuple[Table, list[str]]:
    """The table with the most important metrics that fit `width` columns, and the measured metrics
    left out (a metric no result measured, e.g. token agree with --no-fidelity, is left out silently)."""
    measured = _measured(summary)
    shown = [m for m in all_metrics(summary) if m in measured]
    for k in range(len(shown), 0, -1):
        keep = set(sorted(shown, key=PRIORITY.index)[:k])
        metrics = [m for m in shown if m in keep]
        table = summary_table(summary, weights, metrics)
        if _width(console, table) <= width:
            return table, [m for m in shown if m not in keep]
    return summary_table(summary, weights, []), shown


def print_summary(summary: list[dict], out_dir, weights: str, console: Console | None = None,
                  wide: bool = False, earlier_runs: int = 0) -> None:
    """Print the end-of-run table, the reasons of skipped/failed results and where the files are;
    `earlier_runs`: other runs the directory holds (--append), whose results are not in `summary`."""
    if console is None:
        terminal = stdout_console()
        width = terminal.width if terminal.is_terminal else None
        console = stdout_console(width=width if wide else min(width or NARROW, NARROW))
        if wide and width is None:  # not a terminal: as wide as the table
            console = stdout_console(width=max(NARROW, _width(console, summary_table(summary, weights))))
    if wide:
        table, hidden = summary_table(summary, weights), []
    else:
        table, hidden = fitted_table(summary, weights, console, console.width)
    console.print(table)
    if hidden:
        console.print(f"not shown here: {', '.join(title(m) for m in hidden)} (--wide, or summary.csv)")
    for ident, _, status, error, _ in _results(summary):
        if status != "ok":
            console.print(f"[yellow]{ident['variant']} ({ident['engine']}): {status}[/]: {error}")
    note = _invalid_note(summary)
    if note:
        console.print(note)
    if weights == "random":
        fidelity = bool(_measured(summary) & set(FIDELITY_METRICS))
        console.print("[bold]weights=random[/]: timings are real (shapes decide time), generated text is meaningless"
                      + (";" if fidelity else "."))
        if fidelity:  # not said of columns a run without the fidelity probe does not have
            console.print("token agree and KL measure numeric fidelity only.")
    console.print(f"results in {out_dir}/: runs.csv, summary.csv, env.json"
                  + (f" (this run's; summary.csv and runs.csv hold {earlier_runs} earlier run"
                     f"{'s' if earlier_runs > 1 else ''} too, by run_id)" if earlier_runs else ""))

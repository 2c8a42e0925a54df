"""Console output: the readable end-of-run table (rich). Progress lines: bench.log."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from bench.measure.schema import RESULT_KEY, WORKLOAD_KEYS, point_label, title

# Metrics shown (their titles: bench.measure.schema); a sweep adds SWEEP_SHOWN.
SHOWN = [(m, title(m)) for m in ("ttft_ms", "prefill_ms", "vision_ms", "tpot_ms", "decode_tok_s", "e2e_ms",
                                 "peak_alloc_mb", "weight_mb", "token_agree", "kl_mean", "engine_kl_mean")]
SWEEP_SHOWN = [(m, title(m)) for m in ("requests_per_s", "output_tok_s")]
# A row of the table per result: its identity (the workload point as one label) and its status.
_IDENTITY = [k for k in RESULT_KEY if k not in WORKLOAD_KEYS]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v != 0 and abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def print_summary(summary: list[dict], out_dir, weights: str, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 160)
    points = {point_label(r) for r in summary if r.get("status") == "ok"}
    sweep = len(points) > 1
    shown = SHOWN + (SWEEP_SHOWN if sweep else [])
    table = Table(title=f"median per run  (weights={weights})", show_lines=False)
    for col in ("variant", "engine", "cache") + (("point",) if sweep else ()) + ("n",):
        table.add_column(col)
    for _, heading in shown:
        table.add_column(heading, justify="right")
    table.add_column("valid")
    keyed: dict[tuple, dict] = {}
    for r in summary:
        key = (*(r.get(k) for k in _IDENTITY), point_label(r) if r["status"] == "ok" else "", r.get("run_id"),
               r["status"], r.get("error"))
        keyed.setdefault(key, {})[r.get("metric")] = r
    notes = []
    for key, metrics in keyed.items():
        ident = dict(zip(_IDENTITY, key))
        variant, engine, state = ident["variant"], ident["engine"], ident["cache_state"]
        pt, status, error = key[-4], key[-2], key[-1]
        where = (pt,) if sweep else ()
        if status != "ok":
            table.add_row(variant, engine or "", "", *where, "0", *["-"] * len(shown), f"[yellow]{status}[/]")
            notes.append(f"[yellow]{variant}: {status}[/]: {error}")
            continue
        n = max(m.get("n", 0) for m in metrics.values())
        valid = all(m.get("valid") for k, m in metrics.items() if k in ("e2e_ms", "ttft_ms"))
        table.add_row(variant, engine, state, *where, str(n),
                      *[_fmt(metrics.get(k, {}).get("median")) for k, _ in shown],
                      "yes" if valid else "[red]no[/]")
    console.print(table)
    for note in notes:
        console.print(note)
    if weights == "random":
        console.print("[bold]weights=random[/]: timings are real (shapes decide time); generated text is meaningless, "
                      "and token agree / KL measure numeric fidelity only.")
    console.print(f"results: {out_dir}/runs.csv, {out_dir}/summary.csv, {out_dir}/env.json")

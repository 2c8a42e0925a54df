"""Console output: the readable end-of-run table (rich). Progress lines: bench.log."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

SHOWN = [("ttft_ms", "TTFT ms"), ("prefill_ms", "prefill ms"), ("vision_ms", "vision ms"),
         ("tpot_ms", "TPOT ms"), ("decode_tok_s", "decode tok/s"), ("e2e_ms", "e2e ms"),
         ("peak_alloc_mb", "peak MiB"), ("weight_mb", "weights MiB"), ("token_agree", "token agree"),
         ("kl_mean", "KL mean"), ("engine_kl_mean", "engine KL")]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v != 0 and abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def print_summary(summary: list[dict], out_dir, weights: str, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 160)
    from bench.run.workload import point_label as point

    points = {point(r) for r in summary if r.get("status") == "ok"}
    sweep = len(points) > 1
    shown = SHOWN + ([("requests_per_s", "req/s"), ("output_tok_s", "out tok/s")] if sweep else [])
    table = Table(title=f"median per run  (weights={weights})", show_lines=False)
    for col in ("variant", "engine", "cache") + (("point",) if sweep else ()) + ("n",):
        table.add_column(col)
    for _, title in shown:
        table.add_column(title, justify="right")
    table.add_column("valid")
    keyed: dict[tuple, dict] = {}
    for r in summary:
        key = (r["model"], r["variant"], r["engine"], r["cache_state"], point(r) if r["status"] == "ok" else "",
               r["status"], r.get("error"))
        keyed.setdefault(key, {})[r.get("metric")] = r
    notes = []
    for (model, variant, engine, state, pt, status, error), metrics in keyed.items():
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

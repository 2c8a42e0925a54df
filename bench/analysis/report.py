"""report.md and the figures from results directories, without Jupyter.

    python -m bench report RESULTS_DIR [RESULTS_DIR ...] --out DIR

Every table cell and figure bar is one result's number: results are labelled, never pooled or
averaged (bench.analysis.sources). The comparison notebook calls the same functions, so the
notebook and the static report show the same thing. Skipped/failed variants and invalid
summaries are shown as such.
"""
from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bench.analysis import figures
from bench.analysis.inputs import check_out_dir
from bench.analysis.sources import BASELINE, first_point, label_order, load, status_rows
from bench.errors import real_path, shown_path
from bench.measure.schema import VALIDITY_METRICS, WORKLOAD_KEYS


def _baseline_for(bases: pd.DataFrame, row) -> pd.DataFrame:
    """The baseline rows to hold a variant's row against: those of its own identity (family,
    weights, device, dtype, workload point), from its own directory and run where it has them.
    Empty when there is none, or when several results would qualify (the table then says
    nothing, never a ratio against another identity or a pooled one)."""
    for col in ("family", "weights", "device", "dtype", *WORKLOAD_KEYS):
        if col in bases and col in row:
            bases = bases[bases[col] == row[col]]
    for col in ("source", "run_id"):
        if col in bases and (bases[col] == row.get(col)).any():
            bases = bases[bases[col] == row[col]]
    if bases["metric"].duplicated().any():
        return bases.iloc[0:0]
    return bases


def _one_result(rows: pd.DataFrame, what: str) -> pd.Series:
    """metric -> median of one result's summary rows; ValueError if they hold several results."""
    if rows["metric"].duplicated().any():
        raise ValueError(f"{what}: several results under one label")
    return rows.set_index("metric")["median"]


def speedup_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per result at its model's first workload point in its source: medians of TTFT, TPOT, e2e and
    peak memory, each with its ratio baseline / variant (>1 = faster or smaller; empty without a
    baseline of the same identity), fidelity and whether the latency summaries are valid."""
    out = []
    ok = first_point(summary)
    ok = ok[ok["status"] == "ok"]
    for model, g in ok.groupby("model"):
        bases = g[(g["variant"] == BASELINE[0]) & (g["engine"] == BASELINE[1])]
        for label, v in g.groupby("label", sort=False):
            bmed = _one_result(_baseline_for(bases, v.iloc[0]), f"{model} baseline for {label}")
            vmed = _one_result(v, f"{model} {label}")
            row = {"model": model, "variant": label}
            for m in ("ttft_ms", "tpot_ms", "e2e_ms", "peak_alloc_mb"):
                row[f"{m} median"] = vmed.get(m, math.nan)
                row[f"speedup {m.removesuffix('_ms').removesuffix('_mb')}"] = (
                    bmed[m] / vmed[m] if m in bmed and m in vmed else math.nan)
            for m in ("kl_mean", "token_agree"):
                row[m] = vmed.get(m, math.nan)
            row["valid"] = bool(v[v["metric"].isin(VALIDITY_METRICS)]["valid"].all())
            out.append(row)
    df = pd.DataFrame(out)
    if df.empty:
        return df
    order = {lab: i for i, lab in enumerate(label_order(df["variant"]))}
    return df.sort_values(["model", "variant"], key=lambda c: c.map(order) if c.name == "variant" else c)


def _md(df: pd.DataFrame) -> str:
    """Markdown table (written here: pandas' to_markdown needs the extra 'tabulate' package).
    A missing number is '-'; a cell holds one value, never a pandas object's text."""
    cols = list(df.columns)

    def cell(v):
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, numbers.Real):
            return "-" if math.isnan(v) else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        if isinstance(v, str):
            return v.replace("|", "\\|").replace("\n", " ") or "-"
        raise TypeError(f"table cell {v!r}: not a number or text")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(dirs: list[str | Path], out: str | Path) -> Path:
    """report.md and its figures in `out`, replacing an earlier report's there (a PNG of another
    name is kept). They are drawn into a folder of their own inside `out` and moved in once all
    are drawn, so a report that fails leaves `out` as it was (not made, when it was not there)."""
    out = Path(out)
    check_out_dir(out)
    runs, summary = load(dirs)  # every input checked before --out is made
    made = [d for d in (out, *out.parents) if not d.exists()]  # innermost first, removed if the report fails
    drawn = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        drawn = Path(tempfile.mkdtemp(prefix=".report-", suffix=".tmp", dir=out))
        written = _draw(dirs, runs, summary, drawn)
        for name in [f"{n}.png" for n in written] + ["report.md"]:  # report.md last: it links to the figures
            os.replace(drawn / name, out / name)
        drawn.rmdir()
    except BaseException:
        if drawn is not None:
            shutil.rmtree(drawn, ignore_errors=True)
        for d in made:
            try:
                d.rmdir()  # only while empty
            except OSError:
                break
        raise
    for name in figures.FIGURES:  # an earlier report's figure this one does not draw would sit beside it
        if name not in written:
            (out / f"{name}.png").unlink(missing_ok=True)
    return out / "report.md"


def _draw(dirs: list[str | Path], runs: pd.DataFrame, summary: pd.DataFrame, out: Path) -> list[str]:
    """Write the figures and report.md into `out`; the names of the figures drawn."""
    written = []
    for name, make in figures.FIGURES.items():
        fig = make(summary)
        if fig is None:
            continue
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(name)
    # a directory's name need not be UTF-8; report.md is
    parts = [f"# Benchmark report\n\nSources: {', '.join(shown_path(d) for d in dirs)}."]
    if (summary["series"] != summary["variant"]).any():
        parts.append("Labels add to the variant what tells results of one model and variant apart: the identity "
                     "columns they differ in, the source directory (in parentheses) where several directories hold "
                     "the model, the run id where results are otherwise alike.")
    if (runs.get("weights") == "random").any():
        parts.append("**weights=random**: timings are real (shapes decide time); text, token agreement and KL "
                     "measure numeric behaviour only.")
    sp, st = speedup_table(summary), status_rows(summary)
    parts.append("## Speed-up over fp16 (hf engine)\n\n" + (
        "Ratios of medians, baseline / variant (>1 is faster or smaller; - where a result has no baseline of its "
        "own identity or no such column). `valid` = enough runs, time and CV under the threshold for TTFT and "
        "TPOT.\n\n" + _md(sp) if not sp.empty else
        "No measured result (see Skipped or failed)." if not st.empty else
        "No measured result: summary.csv holds no result (`python -m bench summarize DIR` rebuilds it from "
        "runs.csv)."))
    ok = summary[summary["status"] == "ok"]
    if any(ok[k].nunique() > 1 for k in WORKLOAD_KEYS):
        parts.append("Workload sweeps: the table and the per-variant figures show each model's first workload "
                     "point in each directory; the sweep figures (batch, prompt length, loader) show the axes.")
    if not st.empty:
        parts.append("## Skipped or failed\n\n" + _md(st))
    parts.append("\n".join(f"![{n}]({n}.png)" for n in written))
    (out / "report.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return written


START, END = "<!-- report:start (generated by python -m bench report --readme) -->", "<!-- report:end -->"


def marker_problem(text: str) -> str | None:
    """Why a Markdown text cannot take the report's block (None if it can): it needs the start
    marker, then the end marker, once each (a second pair's block would be lost in the first's)."""
    starts, ends = text.count(START), text.count(END)
    if not starts or END not in text.split(START, 1)[1]:
        return f"no report markers ({START} ... {END}, in that order)"
    if starts > 1 or ends > 1:
        return f"keep one of each of the report's markers ({START}: {starts}, {END}: {ends})"
    return None


def embed_in_readme(readme: Path, report_md: Path) -> None:
    """Put the report's table and figures between the markers, links relative to the README; the
    rest of the README is kept byte for byte (UTF-8 whatever the locale, its own line ends)."""
    text = readme.read_bytes().decode("utf-8")
    if problem := marker_problem(text):
        raise FileNotFoundError(f"{readme}: {problem}")
    rel = real_path(report_md.parent).relative_to(real_path(readme).parent)
    body = report_md.read_bytes().decode("utf-8").split("\n", 1)[1]  # drop the report's own title
    body = body.replace("](", f"]({rel.as_posix()}/")
    # what the results say (a directory's name, an error) never makes a marker of the README's
    body = body.replace("<!--", "&lt;!--")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    nl = "\r\n" if rest.startswith("\r\n") else "\n"
    block = nl.join(body.strip().split("\n"))
    readme.write_bytes(f"{head}{START}{nl}{block}{nl}{END}{tail}".encode("utf-8"))

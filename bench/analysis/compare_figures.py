"""Figures of a baseline/candidate comparison (bench.analysis.compare): the verdicts' ratios and
the per-run samples side by side. The regression notebook draws these.

Rows are named by what tells them apart: the variant and cache state, then the identity columns
and the workload point where the compared results differ in them, then the metric.
"""
from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bench.analysis.compare import KEYS
from bench.analysis.plotting import (TICK_FONT, bar_rows, boxplot_horizontal, fit_notes, label_width,
                                     legend_outside, new_figure)
from bench.measure.schema import WORKLOAD_KEYS, point_label

VERDICT_COLOURS = {"regression": "#c44e52", "missing": "#8b1a1a", "improvement": "#55a868", "unchanged": "#8c8c8c",
                   "inconclusive": "#dd8452"}
NAMED = ("model", "family", "weights", "engine", "device", "dtype")  # named when the rows differ in them


def result_names(rows: pd.DataFrame) -> list[str]:
    """One name per row of `rows` (columns KEYS): 'prefix [warm]', with 'tiny-llava', 'float16',
    'b4 n8' ... added where the rows differ in them."""
    named = [c for c in NAMED if c in rows and rows[c].nunique() > 1]
    points = any(rows[k].nunique() > 1 for k in WORKLOAD_KEYS if k in rows)
    names = []
    for r in rows.to_dict("records"):
        parts = [str(r[c]) for c in named] + [r["variant"]]
        if r["cache_state"] in ("cold", "warm"):
            parts.append(f"[{r['cache_state']}]")
        if points:
            parts.append(point_label(r))
        names.append(" ".join(parts))
    return names


def fig_ratios(verdicts: pd.DataFrame, factor: float):
    """Candidate / baseline ratio per result and metric, coloured by verdict, with the factor a
    verdict needs; None when nothing was compared."""
    if verdicts.empty:
        return None
    rows = [f"{name} {metric}" for name, metric in zip(result_names(verdicts), verdicts["metric"])]
    notes = {row: f"no ratio ({status})" for row, status, ratio in zip(rows, verdicts["status"], verdicts["ratio"])
             if pd.isna(ratio)}
    fig, grid = new_figure([len(rows)], 1, 7 + label_width(rows))
    ax = grid[0][0]
    ax.barh(range(len(rows)), verdicts["ratio"].fillna(0.0).to_numpy(), height=0.7,
            color=[VERDICT_COLOURS.get(s, "#4c72b0") for s in verdicts["status"]])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(factor, color="#c44e52", ls="--", lw=0.8)
    ax.axvline(1 / factor, color="#55a868", ls="--", lw=0.8)
    bar_rows(ax, rows, notes)
    ax.set_xlabel("candidate / baseline (Hodges-Lehmann ratio)", fontsize=9)
    present = [s for s in VERDICT_COLOURS if (verdicts["status"] == s).any()]
    handles = [Patch(color=VERDICT_COLOURS[s], label=s) for s in present]
    handles += [Line2D([], [], color="k", lw=0.8, label="1.0: no change"),
                Line2D([], [], color="#c44e52", ls="--", lw=0.8, label=f"{factor:g}: slower / larger beyond"),
                Line2D([], [], color="#55a868", ls="--", lw=0.8, label=f"1/{factor:g}: faster / smaller beyond")]
    legend_outside(ax, handles=handles, title="verdict", title_fontsize=TICK_FONT)
    ax.set_title("Candidate vs baseline: ratio per result and metric, coloured by verdict", fontsize=10)
    fit_notes(fig)
    return fig


def fig_samples(base: pd.DataFrame, cand: pd.DataFrame, metric: str):
    """Each result's per-run samples of `metric`, baseline above candidate; None when the two
    sides share no result with that metric."""
    keys = [k for k in KEYS if k in base and k in cand]
    groups_b = {k: g[metric].dropna() for k, g in base.groupby(keys)} if metric in base else {}
    groups_c = {k: g[metric].dropna() for k, g in cand.groupby(keys)} if metric in cand else {}
    shared = sorted(k for k in set(groups_b) & set(groups_c) if len(groups_b[k]) and len(groups_c[k]))
    if not shared:
        return None
    names = result_names(pd.DataFrame(shared, columns=keys))
    data, labels = [], []
    for key, name in zip(shared, names):
        for side, groups in (("baseline", groups_b), ("candidate", groups_c)):
            data.append(groups[key].to_numpy())
            labels.append(f"{name} {side}")
    fig, grid = new_figure([len(labels)], 1, 6 + label_width(labels))
    ax = grid[0][0]
    boxplot_horizontal(ax, data, labels)
    ax.invert_yaxis()  # baseline above its candidate, results in order top to bottom
    ax.tick_params(labelsize=TICK_FONT)
    ax.set_xlabel(metric, fontsize=9)
    ax.set_title(f"{metric}: per-run samples, baseline vs candidate", fontsize=10)
    return fig

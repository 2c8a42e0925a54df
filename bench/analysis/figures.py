"""The report's figures, from a loaded summary (bench.analysis.sources.load): one function per
figure, each returning a matplotlib Figure (or None when the results hold nothing it shows).

Per-variant figures (phases, latency_ci, memory, fidelity, cold_warm) show each model's first
workload point in each source (named in the panel's title when the model was measured at
several), one row per labelled result; failed and skipped results appear as rows that say so. Sweep figures (batch, prompt_length, loader) show the workload axes. A value shown is one
result's median, never a mean over results.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from bench.analysis.plotting import (TICK_FONT, bar_rows, fit_notes, label_width, legend_outside, mib_unit,
                                     new_figure)
from bench.analysis.sources import colours, first_point, label_order
from bench.measure.schema import WORKLOAD_KEYS, point_label

PHASES = [("preprocess_ms", "preprocess (image + text)"), ("lookup_ms", "prefix lookup"), ("restore_ms", "prefix restore"),
          ("vision_ms", "vision"), ("prefill_ms", "prefill"), ("store_ms", "cache store"), ("decode_ms", "decode")]
BEFORE_FIRST_TOKEN = [p for p in PHASES if p[0] not in ("decode_ms", "store_ms")]
MEMORY = {"weight_mb": ("weights as loaded", "#4c72b0"), "peak_alloc_mb": ("peak allocated (torch, GPU)", "#dd8452")}
KL_FLOOR = 1e-7  # KL 0 (identical distributions) is drawn here on the log axis


def _models(df: pd.DataFrame) -> list[str]:
    return sorted(df["model"].dropna().unique())


def _weights_note(df: pd.DataFrame) -> str:
    return " (weights=random: timings real, text meaningless)" if (df.get("weights") == "random").any() else ""


def _panel_rows(s: pd.DataFrame, model: str, metrics: list[str]) -> tuple[list[str], dict[str, str]]:
    """A model's rows: its results that have any of `metrics` (baseline first, then by name),
    then its failed and skipped results, each with its note ('skipped: needs a CUDA device')."""
    m = s[s["model"] == model]
    ok = label_order(m[(m["status"] == "ok") & m["metric"].isin(metrics)]["label"])
    notes = {}
    for r in m[m["status"] != "ok"].drop_duplicates("label").itertuples():
        if r.label not in ok:
            reason = r.error if isinstance(r.error, str) and r.error.strip() else ""
            notes[r.label] = f"{r.status}: {reason}" if reason else r.status
    return ok + sorted(notes), notes


def _medians(s: pd.DataFrame, model: str, rows: list[str], metrics: list[str]) -> pd.DataFrame:
    """label x metric medians of one model's results (rows without them: NaN). pivot refuses
    two results under one label: nothing is averaged."""
    ok = s[(s["model"] == model) & (s["status"] == "ok") & s["metric"].isin(metrics)]
    return ok.pivot(index="label", columns="metric", values="median").reindex(index=rows, columns=metrics)


def _points(df: pd.DataFrame) -> list[str]:
    """The workload points (point_label) of these rows' ok results."""
    ok = df[df["status"] == "ok"].drop_duplicates(list(WORKLOAD_KEYS))
    return sorted({point_label(r) for r in ok[list(WORKLOAD_KEYS)].to_dict("records")})


def _panel_name(summary: pd.DataFrame, model: str) -> str:
    """What a per-variant panel of `model` is titled: the model, and the workload point it shows
    (its first in each source) when the model was measured at several."""
    m = summary[summary["model"] == model]
    if len(_points(m)) < 2:
        return model
    return f"{model} at {' / '.join(_points(first_point(m)))}"


def _per_variant(summary: pd.DataFrame, metrics: list[str], ncols: int, width: float):
    """(figure, grid, [(model, rows, notes, medians, heading)]) for a per-variant figure of these
    metrics: a row of panels per model (titled `heading`: _panel_name), its results then its failed
    and skipped ones; None when no result has any of the metrics."""
    s = first_point(summary)
    panels = []
    for model in _models(s):
        rows, notes = _panel_rows(s, model, metrics)
        if rows:
            panels.append((model, rows, notes, _medians(s, model, rows, metrics), _panel_name(summary, model)))
    if not any(len(rows) > len(notes) for _, rows, notes, _, _ in panels):
        return None
    widest = label_width(r for _, rows, _, _, _ in panels for r in rows)
    fig, grid = new_figure([len(rows) for _, rows, _, _, _ in panels], ncols, width + widest)
    for row in grid:
        for ax in row[1:]:
            ax.tick_params(axis="y", labelleft=False)
    return fig, grid, panels


def fig_phases(summary: pd.DataFrame):
    """Stacked bars of the median time per phase: the whole request (left) and the part before
    the first token (right, decode and cache store left out so the small phases are visible)."""
    made = _per_variant(summary, [p for p, _ in PHASES], 2, 12)
    if made is None:
        return None
    fig, grid, panels = made
    cmap = plt.get_cmap("Set2")
    for row, (model, rows, notes, t, heading) in zip(grid, panels):
        for ax, phases, title in ((row[0], PHASES, "whole request"),
                                  (row[1], BEFORE_FIRST_TOKEN, "until the first token")):
            left = pd.Series(0.0, index=t.index)
            for i, (col, name) in enumerate(PHASES):
                if (col, name) in phases:
                    vals = t[col].fillna(0.0)
                    ax.barh(range(len(rows)), vals.to_numpy(), left=left.to_numpy(), color=cmap(i), label=name,
                            height=0.7)
                    left += vals
            bar_rows(ax, rows, notes if ax is row[0] else None)
            ax.set_xlabel("median ms per request (phases stacked)", fontsize=9)
            ax.set_title(f"{heading}: {title}", fontsize=10)
    handles, names = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(PHASES), fontsize=TICK_FONT)
    fig.suptitle("Time per phase" + _weights_note(summary), fontsize=10)
    fit_notes(fig)
    return fig


def fig_latency_ci(summary: pd.DataFrame):
    """TTFT and TPOT medians with their bootstrap 95% CI; invalid summaries hatched."""
    made = _per_variant(summary, ["ttft_ms", "tpot_ms"], 2, 10)
    if made is None:
        return None
    fig, grid, panels = made
    s = first_point(summary)
    col = colours(s[s["status"] == "ok"]["label"])
    for row, (model, rows, notes, _, heading) in zip(grid, panels):
        for ax, metric, title in ((row[0], "ttft_ms", "TTFT, ms"), (row[1], "tpot_ms", "TPOT, ms/token")):
            t = s[(s["model"] == model) & (s["status"] == "ok") & (s["metric"] == metric)].set_index("label")
            t = t.reindex(rows)
            err = [(t["median"] - t["ci_low"]).clip(lower=0).fillna(0),
                   (t["ci_high"] - t["median"]).clip(lower=0).fillna(0)]
            bars = ax.barh(range(len(rows)), t["median"].fillna(0), xerr=err, height=0.7, capsize=2,
                           color=[col.get(lab, "none") for lab in rows], error_kw={"lw": 0.8})
            for bar, valid in zip(bars, t["valid"]):
                if valid == False:  # noqa: E712 - NaN (no result) is not
                    bar.set_hatch("//")
            bar_rows(ax, rows, notes if ax is row[0] else None)
            ax.set_xlabel(f"median {title}", fontsize=9)
            ax.set_title(f"{heading}: {title.split(',')[0]}", fontsize=10)
    fig.suptitle("Latency: median with its 95% bootstrap CI (error bar); hatched: summary not valid"
                 + _weights_note(summary), fontsize=10)
    fit_notes(fig)
    return fig


def fig_memory(summary: pd.DataFrame):
    """Weights as loaded and peak allocated memory, per model in the unit that suits its size."""
    metrics = list(MEMORY)
    made = _per_variant(summary, metrics, 1, 9)
    if made is None:
        return None
    fig, grid, panels = made
    for (ax,), (model, rows, notes, t, heading) in zip(grid, panels):
        scale, unit = mib_unit(t.max().max() if t.notna().any().any() else 0.0)  # each model its own unit
        shown = [m for m in metrics if t[m].notna().any()]  # peak_alloc_mb is empty on the CPU
        for k, metric in enumerate(shown):
            offset = (k - (len(shown) - 1) / 2) * 0.4
            ax.barh([i + offset for i in range(len(rows))], t[metric].fillna(0) * scale,
                    height=0.4 if len(shown) > 1 else 0.6, color=MEMORY[metric][1], label=MEMORY[metric][0])
        bar_rows(ax, rows, notes)
        ax.set_xlabel(f"memory, {unit}", fontsize=9)
        ax.set_title(f"{heading}: memory", fontsize=10)
        legend_outside(ax)
    fit_notes(fig)
    return fig


def fig_fidelity(summary: pd.DataFrame):
    """Answer quality against the fp16 baseline next to decode speed, per result: KL of the
    next-token distributions (log; 0 drawn at 1e-7), greedy token agreement and TPOT."""
    if not (summary["metric"] == "kl_mean").any():
        return None
    made = _per_variant(summary, ["kl_mean", "token_agree", "tpot_ms"], 3, 12)
    if made is None:
        return None
    fig, grid, panels = made
    for row, (model, rows, notes, t, heading) in zip(grid, panels):
        y = range(len(rows))
        kl = t["kl_mean"]
        ax = row[0]
        shown = kl.clip(lower=KL_FLOOR)
        ax.scatter(shown, y, color="#4c72b0", s=24, zorder=3)
        ax.set_xscale("log")
        if shown.notna().any():  # whole decades at both ends: labelled ticks even when the values lie close
            lo, hi = math.floor(math.log10(shown.min())), math.ceil(math.log10(shown.max()))
            ax.set_xlim(10.0 ** lo / 2, 10.0 ** max(hi, lo + 1) * 2)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"KL(fp16 || variant), nats (log; {KL_FLOOR:g} = identical)", fontsize=9)
        ax.set_title(f"{heading}: KL to fp16", fontsize=10)
        ax.grid(axis="x", lw=0.4, alpha=0.5)
        row[1].barh(y, t["token_agree"].fillna(0), height=0.6, color="#55a868")
        for i, share in enumerate(t["token_agree"]):  # the value: a share of 0 draws no bar
            if pd.notna(share):
                row[1].text(share + 0.01, i, f"{share:.2f}", va="center", fontsize=7)
        row[1].set_xlim(0, 1.15)
        row[1].set_xlabel("share of tokens equal to fp16's", fontsize=9)
        row[1].set_title("token agreement", fontsize=10)
        row[2].barh(y, t["tpot_ms"].fillna(0), height=0.6, color="#8172b3")
        row[2].set_xlabel("median ms per token", fontsize=9)
        row[2].set_title("TPOT (decode speed)", fontsize=10)
        for ax in row:
            bar_rows(ax, rows, notes if ax is row[0] else None)
    random = (summary.get("weights") == "random").any()
    fig.suptitle("Fidelity to the fp16 baseline and decode speed"
                 + (" (weights=random: KL and agreement measure numeric fidelity only)" if random else ""), fontsize=10)
    fit_notes(fig)
    return fig


def fig_cold_warm(summary: pd.DataFrame):
    """TTFT of cache variants with the cache cleared (cold) and hit (warm), per result."""
    s = first_point(summary)
    ok = s[(s["status"] == "ok") & (s["metric"] == "ttft_ms") & s["cache_state"].isin(["cold", "warm"])]
    models = _models(ok)
    if not models:
        return None
    tables = [ok[ok["model"] == m].pivot(index="series", columns="cache_state", values="median")
              .reindex(columns=["cold", "warm"]) for m in models]
    tables = [t.reindex(label_order(t.index)) for t in tables]
    fig, grid = new_figure([len(t) for t in tables], 1, 8 + label_width(i for t in tables for i in t.index))
    for (ax,), model, t in zip(grid, models, tables):
        y = range(len(t))
        for state, offset, name, colour in (("cold", -0.2, "cold (cache cleared)", "#c44e52"),
                                            ("warm", 0.2, "warm (cache hit)", "#55a868")):
            ax.barh([i + offset for i in y], t[state].fillna(0), height=0.4, color=colour, label=name)
        bar_rows(ax, list(t.index))
        ax.set_xlabel("median TTFT, ms", fontsize=9)
        ax.set_title(f"{_panel_name(summary, model)}: prefix / embedding cache, cold vs warm", fontsize=10)
        legend_outside(ax)
    return fig


# ---- sweeps ---------------------------------------------------------------------------------
def _sweep(summary: pd.DataFrame, axis: str, metrics: list[str]) -> pd.DataFrame | None:
    """Medians of `metrics` along one workload axis, the other axes held at the first point of
    each model in each source; None when none varies `axis`."""
    ok = summary[(summary["status"] == "ok") & summary["metric"].isin(metrics)]
    if ok.empty:
        return None
    others = [k for k in WORKLOAD_KEYS if k != axis]
    parts = []
    for _, g in ok.groupby(["source", "model"], sort=False):
        if g[axis].nunique() < 2:
            continue
        first = g.iloc[0][others]
        parts.append(g[(g[others] == first).all(axis=1)])
    return pd.concat(parts) if parts else None


STYLES = ["-o", "--s", ":^", "-.D"]  # with tab10's colours: 40 lines told apart


def _lines(ax, t: pd.DataFrame, axis: str, metric: str, order: list[str]):
    cmap = plt.get_cmap("tab10")
    for i, label in enumerate(order):
        g = t[(t["metric"] == metric) & (t["label"] == label)].sort_values(axis)
        if g[axis].duplicated().any():
            raise ValueError(f"{label}: several results at one {axis}")
        ax.plot(g[axis], g["median"], STYLES[i // 10 % len(STYLES)], color=cmap(i % 10), label=label, ms=4, lw=1)
        bad = g[g["valid"] == False]  # noqa: E712 - pandas boolean column
        ax.plot(bad[axis], bad["median"], "x", color="#c44e52", ms=8)


def _sweep_figure(t: pd.DataFrame, axis: str, panels: list[tuple[str, str]], xlabel: str, log2: bool, title: str):
    models = _models(t)
    order = label_order(t["label"])
    legend_in = 0.19 * len(order) + 0.8
    fig, grid = plt.subplots(len(models), len(panels), squeeze=False, layout="constrained",
                             figsize=(4.2 * len(panels) + 1.5 + label_width(order), max(3.4 * len(models), legend_in)))
    for row, model in zip(grid, models):
        m = t[t["model"] == model]
        for ax, (metric, name) in zip(row, panels):
            _lines(ax, m, axis, metric, [lab for lab in order if lab in set(m["label"])])
            if log2:
                ax.set_xscale("log", base=2)
            points = sorted(set(m[axis]))
            ax.set_xticks(points, [f"{x:g}" for x in points])  # the measured points, not 2^k
            ax.minorticks_off()
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_title(f"{model}: {name}", fontsize=9)
            ax.tick_params(labelsize=TICK_FONT)
    handles = [Line2D([], [], linestyle=STYLES[i // 10 % len(STYLES)][:-1], marker=STYLES[i // 10 % len(STYLES)][-1],
                      color=plt.get_cmap("tab10")(i % 10), ms=4, lw=1) for i in range(len(order))]
    handles.append(Line2D([], [], ls="", marker="x", color="#c44e52", ms=8))
    fig.legend(handles, [*order, "summary not valid"], loc="outside right upper", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def fig_batch(summary: pd.DataFrame):
    """Latency and throughput against batch size (x: invalid summary)."""
    t = _sweep(summary, "batch_size", ["ttft_ms", "tpot_ms", "output_tok_s"])
    if t is None:
        return None
    return _sweep_figure(t, "batch_size", [("ttft_ms", "TTFT, ms"), ("tpot_ms", "TPOT (one step), ms"),
                                           ("output_tok_s", "generated tokens / s")],
                         "batch size", True, "Batch sweep" + _weights_note(summary))


def fig_prompt_length(summary: pd.DataFrame):
    """TTFT against the question's length in tokens."""
    t = _sweep(summary, "question_tokens", ["ttft_ms", "prefill_ms"])
    if t is None:
        return None
    return _sweep_figure(t, "question_tokens", [("ttft_ms", "TTFT, ms"), ("prefill_ms", "prefill, ms")],
                         "question length, tokens", False, "Prompt-length sweep" + _weights_note(summary))


def fig_loader(summary: pd.DataFrame):
    """Frame loading serial vs prefetch: share of each stream step the GPU works, and requests/s."""
    ok = summary[(summary["status"] == "ok") & summary["loader"].isin(["serial", "prefetch"])]
    if ok.empty or ok["loader"].nunique() < 2:
        return None
    point = [k for k in WORKLOAD_KEYS if k != "loader"]
    ok = ok.assign(row=[f"{m}: {lab} {point_label({**r, 'loader': ''})}"
                        for m, lab, r in zip(ok["model"], ok["label"], ok[point].to_dict("records"))])
    order = {lab: i for i, lab in enumerate(label_order(ok["label"]))}
    rows = list(dict.fromkeys(ok.sort_values(["model", "label", *point], key=lambda c: c.map(order) if c.name == "label"
                                             else c)["row"]))
    fig, grid = new_figure([len(rows)], 3, 11 + label_width(rows))
    metrics = (("gpu_phase_pct", "GPU phases / stream step, %"), ("gpu_util_pct", "NVML GPU utilisation, % (lags)"),
               ("requests_per_s", "requests / s"))
    for ax, (metric, title) in zip(grid[0], metrics):
        t = ok[ok["metric"] == metric].pivot(index="row", columns="loader", values="median").reindex(
            index=rows, columns=["serial", "prefetch"])
        y = range(len(rows))
        if t.isna().all().all():
            ax.text(0.5, 0.5, "no values\n(no NVML: CPU run)" if metric == "gpu_util_pct" else "no values",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#6f6f6f")
            ax.set_xticks([])
        for loader, offset, name, colour in (("serial", -0.2, "serial (read + preprocess when needed)", "#c44e52"),
                                             ("prefetch", 0.2, "prefetch (background thread ahead)", "#55a868")):
            ax.barh([i + offset for i in y], t[loader].fillna(0), height=0.4, color=colour, label=name)
        bar_rows(ax, rows)
        ax.set_title(title, fontsize=9)
    grid[0][1].tick_params(axis="y", labelleft=False)
    grid[0][2].tick_params(axis="y", labelleft=False)
    handles, names = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2, fontsize=TICK_FONT)
    fig.suptitle("Video frames: loading overlapped with GPU work or not" + _weights_note(summary), fontsize=9)
    return fig


FIGURES = {"phases": fig_phases, "latency_ci": fig_latency_ci, "memory": fig_memory, "fidelity": fig_fidelity,
           "cold_warm": fig_cold_warm, "batch": fig_batch, "prompt_length": fig_prompt_length, "loader": fig_loader}

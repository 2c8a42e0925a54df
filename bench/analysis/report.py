"""Figures and a Markdown summary from results directories, without Jupyter.

    python -m bench report RESULTS_DIR [RESULTS_DIR ...] --out DIR

The comparison notebook calls the same functions, so the notebook and the static report
always show the same thing. Skipped/failed variants and invalid summaries are shown as such.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt  # headless: matplotlib picks Agg; notebooks: the inline backend
import pandas as pd

from bench.analysis.inputs import BadInput, check_out_dir, check_results_csv
from bench.measure.schema import WORKLOAD_KEYS, fill_identity_columns

PHASES = [("preprocess_ms", "preprocess (CPU)"), ("lookup_ms", "prefix lookup"), ("restore_ms", "prefix restore"),
          ("vision_ms", "vision"), ("prefill_ms", "prefill"), ("store_ms", "cache store"), ("decode_ms", "decode")]
BASELINE = ("fp16", "hf")
# Identity columns (bench.measure.schema.RESULT_KEY, and the run id) a label names when one
# directory holds rows of one model and variant that differ in them: such rows are never pooled.
LABEL_IDENTITY = ("family", "weights", "engine", "device", "dtype", "run_id")


def check_dirs(dirs: list[str | Path]) -> None:
    """BadInput unless every directory is a results directory with well-formed runs.csv and
    summary.csv, each given once."""
    seen: dict[Path, str] = {}
    for d in dirs:
        key = Path(d).resolve()
        if key in seen:
            raise BadInput(f"{d}: given twice (also as {seen[key]}); give each results directory once")
        seen[key] = str(d)
        if not Path(d).is_dir():
            raise BadInput(f"{d}: not a results directory")
        for name in ("runs", "summary"):
            if not (Path(d) / f"{name}.csv").is_file():
                raise BadInput(f"{d}: no {name}.csv")
            check_results_csv(Path(d) / f"{name}.csv", name)


def load(dirs: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    check_dirs(dirs)
    runs, summaries = [], []
    for d in dirs:
        d = Path(d)
        for name, bucket in (("runs.csv", runs), ("summary.csv", summaries)):
            try:
                df = pd.read_csv(d / name, dtype={"error": str, "cache_state": str})
            except (ValueError, pd.errors.ParserError) as e:  # what check_dirs did not foresee
                raise BadInput(f"{d / name}: not readable ({e.__class__.__name__})") from None
            df["source"] = d.name
            bucket.append(df)
    runs_df, summary_df = pd.concat(runs, ignore_index=True), pd.concat(summaries, ignore_index=True)
    for df in (runs_df, summary_df):
        fill_identity_columns(df)  # columns older versions did not write: their documented defaults
        df["label"] = [_label(v, c) for v, c in zip(df["variant"], df["cache_state"])]
    # One directory, one model and variant, rows differing in identity (two dtypes, devices,
    # invocations): the label names what differs
    both = pd.concat([runs_df, summary_df], ignore_index=True)
    groups = both.groupby(["source", "model", "label"])
    varying = {c: set(n[n > 1].index) for c in LABEL_IDENTITY for n in [groups[c].nunique()]}
    for df in (runs_df, summary_df):
        keys = list(zip(df["source"], df["model"], df["label"]))
        extra = pd.Series("", index=df.index)
        for c, where in varying.items():
            if where:
                hit = [k in where for k in keys]
                extra[hit] += " " + df.loc[hit, c].astype(str)
        df["label"] = df["label"] + extra
    # The same variant from two directories of one model: say which directory each bar is
    sources = summary_df.groupby(["model", "label"])["source"].nunique()
    shared = set(sources[sources > 1].index)
    for df in (runs_df, summary_df):
        df["label"] = [f"{lab} ({src})" if (m, lab) in shared else lab
                       for m, lab, src in zip(df["model"], df["label"], df["source"])]
        # the label less the cache state: what a cold/warm pair shares
        df["series"] = [lab.replace(f" [{c}]", "", 1) for lab, c in zip(df["label"], df["cache_state"])]
    return runs_df, summary_df


def first_point(df: pd.DataFrame) -> pd.DataFrame:
    """Each source directory's rows at its first workload point (a sweep's figures compare
    points; the per-variant figures compare variants at one point). Skipped rows stay."""
    keys = list(WORKLOAD_KEYS)
    keep = []
    for _, g in df.groupby("source", sort=False):
        ok = g[g["status"] == "ok"] if "status" in g else g
        if ok.empty:
            keep.append(g)
            continue
        first = ok.iloc[0][keys]
        keep.append(g[(g["status"] != "ok") | (g[keys] == first).all(axis=1)])
    return pd.concat(keep) if keep else df


def _label(variant: str, cache_state: str) -> str:
    return f"{variant} [{cache_state}]" if cache_state in ("cold", "warm") else variant


def label_order(labels) -> list[str]:
    """Stable order: the baseline first, then by name (cold before warm)."""
    uniq = sorted(set(labels), key=lambda s: (s.split(" [")[0] != "fp16", s))
    return uniq


def colours(labels) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20")
    return {lab: cmap(i % 20) for i, lab in enumerate(label_order(labels))}


def metric_table(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    s = summary[(summary["status"] == "ok") & (summary["metric"] == metric)]
    return s.set_index(["model", "label"])[["median", "ci_low", "ci_high", "n", "valid"]]


def status_rows(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["status"] != "ok"][["model", "variant", "engine", "status", "error"]].drop_duplicates()


def _baseline_for(bases: pd.DataFrame, row) -> pd.DataFrame:
    """The baseline rows to hold a variant's row against: those of its own identity (family,
    weights, device, dtype, workload point), from its own directory where it has them. Empty when
    there is none, or when several runs would qualify (the table then says nothing, never a
    ratio against another identity or a pooled one)."""
    for col in ("family", "weights", "device", "dtype", *WORKLOAD_KEYS):
        if col in bases and col in row:
            bases = bases[bases[col] == row[col]]
    if "source" in bases and (bases["source"] == row.get("source")).any():
        bases = bases[bases["source"] == row["source"]]
    if bases["metric"].duplicated().any():
        return bases.iloc[0:0]
    return bases


def speedup_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Median ratios baseline / variant (>1 = faster) per model, for TTFT, TPOT and e2e."""
    out = []
    ok = summary[summary["status"] == "ok"]
    for model, g in ok.groupby("model"):
        bases = g[(g["variant"] == BASELINE[0]) & (g["engine"] == BASELINE[1])]
        for label, v in g.groupby("label", sort=False):
            bmed = _baseline_for(bases, v.iloc[0]).drop_duplicates("metric").set_index("metric")["median"]
            vmed = v.set_index("metric")["median"]
            row = {"model": model, "variant": label}
            for m in ("ttft_ms", "tpot_ms", "e2e_ms", "peak_alloc_mb"):
                row[f"{m} median"] = vmed.get(m, math.nan)
                row[f"speedup {m.removesuffix('_ms').removesuffix('_mb')}"] = (
                    bmed.get(m, math.nan) / vmed.get(m, math.nan) if m in bmed and m in vmed else math.nan)
            for m in ("kl_mean", "token_agree"):
                row[m] = vmed.get(m, math.nan)
            row["valid"] = bool(v[v["metric"].isin(["ttft_ms", "tpot_ms"])]["valid"].all())
            out.append(row)
    df = pd.DataFrame(out)
    if df.empty:
        return df
    order = {lab: i for i, lab in enumerate(label_order(df["variant"]))}
    return df.sort_values(["model", "variant"], key=lambda c: c.map(order) if c.name == "variant" else c)


def _models(df: pd.DataFrame) -> list[str]:
    return sorted(df["model"].dropna().unique())


def _axes(n_models: int, width: float = 11, height: float = 3.6):
    fig, axes = plt.subplots(n_models, 1, figsize=(width, height * n_models), squeeze=False)
    return fig, [a[0] for a in axes]


def _weights_note(df: pd.DataFrame) -> str:
    return " (weights=random: timings real, text meaningless)" if (df.get("weights") == "random").any() else ""


def fig_phases(runs: pd.DataFrame):
    """Stacked bars of median time per phase per variant: the whole request (left) and the part
    before the first token (right, decode left out so the small phases are visible)."""
    m = runs[(runs["kind"] == "measured") & (runs["status"] == "ok")]
    models = _models(m)
    fig, grid = plt.subplots(len(models), 2, figsize=(14, 3.8 * len(models)), squeeze=False)
    cmap = plt.get_cmap("Set2")
    for row, model in zip(grid, models):
        g = m[m["model"] == model].groupby("label")[[p for p, _ in PHASES]].median()
        g = g.reindex(label_order(g.index))
        for ax, phases, title in ((row[0], PHASES, "whole request"),
                                  (row[1], [p for p in PHASES if p[0] not in ("decode_ms", "store_ms")],
                                   "until the first token")):
            left = pd.Series(0.0, index=g.index)
            for i, (col, name) in enumerate(PHASES):
                if (col, name) not in phases:
                    continue
                vals = g[col].fillna(0.0)
                ax.barh(g.index, vals, left=left, color=cmap(i), label=name)
                left += vals
            ax.invert_yaxis()
            ax.set_xlabel("median ms per request (stacked phases)")
            ax.set_title(f"{model}: {title}")
        row[1].legend(fontsize=7, loc="lower right")
        row[1].set_yticklabels([])
    fig.suptitle("Time per phase" + _weights_note(runs), fontsize=10)
    fig.tight_layout()
    return fig


def fig_latency_ci(summary: pd.DataFrame):
    """TTFT and TPOT medians with bootstrap 95% CI; invalid summaries hatched."""
    ok = summary[summary["status"] == "ok"]
    models = _models(ok)
    fig, grid = plt.subplots(len(models), 2, figsize=(12, 3.6 * len(models)), squeeze=False)
    col = colours(ok["label"])
    for row, model in zip(grid, models):
        for ax, metric, title in ((row[0], "ttft_ms", "TTFT, ms"), (row[1], "tpot_ms", "TPOT, ms/token")):
            t = ok[(ok["model"] == model) & (ok["metric"] == metric)].set_index("label")
            t = t.reindex([lab for lab in label_order(t.index)])
            err = [(t["median"] - t["ci_low"]).clip(lower=0).fillna(0), (t["ci_high"] - t["median"]).clip(lower=0).fillna(0)]
            bars = ax.barh(t.index, t["median"], xerr=err, color=[col[lab] for lab in t.index], capsize=3)
            for bar, valid in zip(bars, t["valid"]):
                if not bool(valid):
                    bar.set_hatch("//")
            ax.invert_yaxis()
            ax.set_xlabel(f"median {title} (error bar: 95% CI; hatched: not valid)")
            ax.set_title(f"{model}: {title.split(',')[0]}")
    fig.tight_layout()
    return fig


def _paired_barh(ax, table: pd.DataFrame, bars: list[tuple[str, float, str, str | None]], scale: float = 1.0):
    """Two thin bars per row of `table`: (column, offset, legend label, colour) each; legend outside."""
    y = range(len(table))
    for column, offset, label, colour in bars:
        if column in table:
            ax.barh([i + offset for i in y], table[column] * scale, height=0.4, color=colour, label=label)
    ax.set_yticks(list(y), table.index)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def fig_memory(summary: pd.DataFrame):
    ok = summary[(summary["status"] == "ok") & (summary["metric"].isin(["peak_alloc_mb", "weight_mb"]))]
    models = _models(ok)
    if not models:
        return None
    fig, axes = _axes(len(models))
    for ax, model in zip(axes, models):
        t = ok[ok["model"] == model].pivot_table(index="label", columns="metric", values="median")
        t = t.reindex([lab for lab in label_order(t.index)])
        _paired_barh(ax, t, [("peak_alloc_mb", 0.2, "peak allocated (torch)", None),
                             ("weight_mb", -0.2, "weights as loaded", None)], scale=1 / 1024)
        ax.set_xlabel("GiB")
        ax.set_title(f"{model}: memory")
    fig.tight_layout()
    return fig


def fig_fidelity(summary: pd.DataFrame):
    """Fidelity against speed: KL to the fp16 baseline vs TPOT; token agreement annotated."""
    ok = summary[summary["status"] == "ok"]
    models = _models(ok)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    col = colours(ok["label"])
    for ax, model in zip(axes[0], models):
        t = ok[ok["model"] == model].pivot_table(index="label", columns="metric", values="median")
        if "kl_mean" not in t or "tpot_ms" not in t:
            ax.set_title(f"{model}: no fidelity columns")
            continue
        for lab in label_order(t.index):
            kl, tp = t.loc[lab, "kl_mean"], t.loc[lab, "tpot_ms"]
            ax.scatter(tp, max(kl, 1e-7), color=col[lab], s=50)
            agree = t.loc[lab].get("token_agree", math.nan)
            ax.annotate(f"{lab}\nagree {agree:.2f}", (tp, max(kl, 1e-7)), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("TPOT, ms/token (median)")
        ax.set_ylabel("KL(fp16 || variant), mean (log; 1e-7 = identical)")
        ax.set_title(f"{model}: quality cost vs decode speed")
    fig.suptitle("Fidelity vs speed" + _weights_note(summary) + " — random weights: numeric fidelity only",
                 fontsize=9)
    fig.tight_layout()
    return fig


def fig_cold_warm(summary: pd.DataFrame):
    ok = summary[(summary["status"] == "ok") & (summary["metric"] == "ttft_ms")
                 & (summary["cache_state"].isin(["cold", "warm"]))]
    models = _models(ok)
    if not models:
        return None
    fig, axes = _axes(len(models), height=3.0)
    for ax, model in zip(axes, models):
        t = ok[ok["model"] == model].pivot_table(index="series", columns="cache_state", values="median")
        _paired_barh(ax, t, [("cold", -0.2, "cold (cache cleared)", "#c44e52"),
                             ("warm", 0.2, "warm (cache hit)", "#55a868")])
        ax.set_xlabel("median TTFT, ms")
        ax.set_title(f"{model}: prefix / embedding cache, cold vs warm")
    fig.tight_layout()
    return fig


def _sweep(summary: pd.DataFrame, axis: str, metrics: list[str]) -> pd.DataFrame | None:
    """Medians of `metrics` along one workload axis, the other axes held at each source's first
    point; None when no source varies `axis`."""
    ok = summary[(summary["status"] == "ok") & summary["metric"].isin(metrics)]
    if ok.empty:
        return None
    others = [k for k in WORKLOAD_KEYS if k != axis]
    parts = []
    for _, g in ok.groupby("source", sort=False):
        if g[axis].nunique() < 2:
            continue
        first = g.iloc[0][others]
        parts.append(g[(g[others] == first).all(axis=1)])
    return pd.concat(parts) if parts else None


def _lines(ax, t: pd.DataFrame, axis: str, metric: str, style: str = "-o"):
    for label, g in t[t["metric"] == metric].groupby("label", sort=False):
        g = g.sort_values(axis)
        ax.plot(g[axis], g["median"], style, label=label)
        bad = g[g["valid"] == False]  # noqa: E712 - pandas boolean column
        ax.plot(bad[axis], bad["median"], "x", color="#c44e52", ms=9)


def fig_batch(summary: pd.DataFrame):
    """Latency and throughput against batch size (x: invalid summary)."""
    t = _sweep(summary, "batch_size", ["ttft_ms", "tpot_ms", "e2e_ms", "output_tok_s", "requests_per_s"])
    if t is None:
        return None
    models = _models(t)
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.6 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        m = t[t["model"] == model]
        for ax, metric, title in ((row[0], "ttft_ms", "TTFT, ms"), (row[1], "tpot_ms", "TPOT (one step), ms"),
                                  (row[2], "output_tok_s", "generated tokens / s (prefill included)")):
            _lines(ax, m, "batch_size", metric)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_title(f"{model}: {title}", fontsize=9)
        row[2].legend(fontsize=7)
    fig.suptitle("Batch sweep" + _weights_note(summary), fontsize=9)
    fig.tight_layout()
    return fig


def fig_prompt_length(summary: pd.DataFrame):
    """TTFT (and prefill) against the question's length in tokens."""
    t = _sweep(summary, "question_tokens", ["ttft_ms", "prefill_ms"])
    if t is None:
        return None
    models = _models(t)
    fig, axes = _axes(len(models), width=8, height=3.4)
    for ax, model in zip(axes, models):
        m = t[t["model"] == model]
        _lines(ax, m, "question_tokens", "ttft_ms")
        ax.set_xlabel("question length, tokens")
        ax.set_ylabel("median TTFT, ms")
        ax.set_title(f"{model}: TTFT vs prompt length", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_loader(summary: pd.DataFrame):
    """Frame loading serial vs prefetch: share of each stream step the GPU works, and requests/s."""
    ok = summary[(summary["status"] == "ok") & summary["loader"].isin(["serial", "prefetch"])]
    if ok.empty or ok["loader"].nunique() < 2:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.2 + 0.7 * ok.groupby(["model", "variant", "batch_size"]).ngroups),
                             sharey=True)
    for ax, metric, title in ((axes[0], "gpu_phase_pct", "GPU phases / stream step, %"),
                              (axes[1], "gpu_util_pct", "NVML GPU utilisation, % (lags)"),
                              (axes[2], "requests_per_s", "requests / s")):
        t = ok[ok["metric"] == metric].pivot_table(index=["model", "variant", "batch_size"], columns="loader",
                                                   values="median")
        if t.empty:
            continue
        t.index = [f"{m}\n{v} b{b}" for m, v, b in t.index]
        _paired_barh(ax, t, [("serial", -0.2, "serial (read + preprocess when needed)", "#c44e52"),
                             ("prefetch", 0.2, "prefetch (background thread ahead)", "#55a868")])
        ax.get_legend().remove()
        ax.set_title(title, fontsize=9)
    axes[0].invert_yaxis()  # sharey: every axis inverted it once more
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Video frames: loading overlapped with GPU work or not" + _weights_note(summary), fontsize=9)
    fig.tight_layout()
    return fig


FIGURES = {"phases": fig_phases, "latency_ci": fig_latency_ci, "memory": fig_memory, "fidelity": fig_fidelity,
           "cold_warm": fig_cold_warm}
SWEEP_FIGURES = {"batch": fig_batch, "prompt_length": fig_prompt_length, "loader": fig_loader}


def _md(df: pd.DataFrame) -> str:
    """Markdown table (written here: pandas' to_markdown needs the extra 'tabulate' package)."""
    cols = list(df.columns)

    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(dirs: list[str | Path], out: str | Path) -> Path:
    out = Path(out)
    check_out_dir(out)
    runs, summary = load(dirs)  # every input checked before --out is made
    out.mkdir(parents=True, exist_ok=True)
    written = []
    one_runs, one_summary = first_point(runs), first_point(summary)
    for name, make in {**FIGURES, **SWEEP_FIGURES}.items():
        fig = make(one_runs if name == "phases" else one_summary if name in FIGURES else summary)
        if fig is None:
            continue
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(name)
    parts = [f"# Benchmark report\n\nSources: {', '.join(str(d) for d in dirs)}."]
    if (runs.get("weights") == "random").any():
        parts.append("**weights=random**: timings are real (shapes decide time); text, token agreement and KL "
                     "measure numeric behaviour only.")
    sp = speedup_table(one_summary)
    parts.append("## Speed-up over fp16 (hf engine)\n\nRatios of medians, baseline / variant (>1 is faster or "
                 "smaller). `valid` = enough runs, time and CV under the threshold for TTFT and TPOT.\n\n" + _md(sp))
    st = status_rows(summary)
    if any(summary[k].nunique() > 1 for k in WORKLOAD_KEYS):
        parts.append("Workload sweeps: the table and the per-variant figures show each source's first workload "
                     "point; the sweep figures (batch, prompt length, loader) show the axes.")
    if not st.empty:
        parts.append("## Skipped or failed\n\n" + _md(st))
    parts.append("\n".join(f"![{n}]({n}.png)" for n in written))
    (out / "report.md").write_text("\n\n".join(parts) + "\n")
    return out / "report.md"


START, END = "<!-- report:start (generated by python -m bench report --readme) -->", "<!-- report:end -->"


def embed_in_readme(readme: Path, report_md: Path) -> None:
    """Put the report's table and figures between the markers, links relative to the README."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise FileNotFoundError(f"{readme}: no report markers")
    rel = report_md.parent.resolve().relative_to(readme.parent.resolve())
    body = report_md.read_text().split("\n", 1)[1]  # drop the report's own title
    body = body.replace("](", f"]({rel.as_posix()}/")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{body.strip()}\n{END}{tail}")

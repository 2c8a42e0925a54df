"""Results directories loaded for the report and the comparison notebook: runs.csv and
summary.csv of each, every result labelled so that none is pooled with another or averaged.

A label is the variant, its cache state, then what tells the result apart from the model's
other results of that variant (identity columns, source directory, run id): two directories
that both hold fp16 for one model give two labelled rows, never a mean of the two.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from bench.analysis.inputs import BadInput, check_results_csv
from bench.errors import not_a_file, real_path, shown_path
from bench.measure.results import LOCK_NAME, lock_holder
from bench.measure.schema import WORKLOAD_KEYS, fill_identity_columns

BASELINE = ("fp16", "hf")
# Identity columns (bench.measure.schema.RESULT_KEY) a label names when results of one model and
# variant differ in them; the source directory and the run id come after these when needed.
NAMED_IDENTITY = ("family", "weights", "engine", "device", "dtype")


def check_dirs(dirs: list[str | Path]) -> dict[tuple[str, str], str]:
    """{(directory, "runs.csv" or "summary.csv"): its text as checked}; BadInput unless every
    directory is a results directory with well-formed runs.csv and summary.csv, each given once."""
    seen: dict[Path, str] = {}
    texts = {}
    for d in dirs:
        key = real_path(d)
        if key in seen:
            raise BadInput(f"{d}: given twice (also as {seen[key]}); give each results directory once")
        seen[key] = str(d)
        if not Path(d).is_dir():
            raise BadInput(f"{d}: not a results directory")
        for name in ("runs", "summary"):
            problem = not_a_file(Path(d) / f"{name}.csv")
            if problem:  # there, but no file (a directory, say)
                raise BadInput(f"{d}: its {name}.csv is {problem}")
            if not os.path.lexists(Path(d) / f"{name}.csv"):
                holder = lock_holder(Path(d))  # a run writes summary.csv when it ends
                raise BadInput(f"{d}: no {name}.csv" + (
                    "" if holder is None else f"; a run is writing it ({f'PID {holder}, ' if holder > 0 else ''}"
                                              f"lock file {Path(d) / LOCK_NAME}): read it once the run has ended"))
            texts[(str(d), f"{name}.csv")] = check_results_csv(Path(d) / f"{name}.csv", name)
    return texts


def source_names(dirs: list[str | Path]) -> list[str]:
    """What the labels call each directory: its name, or as many of its last path parts as make
    the names differ (`a/results`, `b/results`); bytes that are not UTF-8 as \\xNN escapes
    (labels go into report.md and figures)."""
    parts = [real_path(d).parts for d in dirs]
    for k in range(1, max(map(len, parts), default=0) + 1):
        names = [shown_path(Path(*p[-k:]).as_posix()) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [shown_path(Path(*p).as_posix()) for p in parts]


def load(dirs: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """runs.csv and summary.csv of every directory, one DataFrame each, with `source` (the
    directory, source_names), `label` (one result's name in tables and figures: label_results)
    and `series` (the label less its cache state: what a cold/warm pair shares)."""
    texts = check_dirs(dirs)
    runs, summaries = [], []
    for d, source in zip(dirs, source_names(dirs)):
        d = Path(d)
        for name, bucket in (("runs.csv", runs), ("summary.csv", summaries)):
            try:
                df = pd.read_csv(io.StringIO(texts[(str(d), name)]),
                                 dtype={"error": str, "cache_state": str, "run_id": str})
            except (ValueError, pd.errors.ParserError) as e:  # what check_dirs did not foresee
                raise BadInput(f"{d / name}: not readable ({e.__class__.__name__})") from None
            df["source"] = source
            bucket.append(df)
    runs_df, summary_df = pd.concat(runs, ignore_index=True), pd.concat(summaries, ignore_index=True)
    for df in (runs_df, summary_df):
        fill_identity_columns(df)  # columns older versions did not write: their documented defaults
        label_results(df)
    return runs_df, summary_df


def label_results(df: pd.DataFrame) -> None:
    """Set `label` and `series`. A label is the variant, its cache state ([cold] / [warm]), then
    what tells it apart from the model's other results of that variant: the identity columns
    that differ among them, the source directory when the model's results come from more than
    one, and the run id where those still leave two results alike."""
    key = ["source", "model", "variant", *NAMED_IDENTITY, "run_id"]
    suffix: dict[tuple, str] = {}
    for _, m in df[key].drop_duplicates().groupby("model", sort=False):
        name_source = m["source"].nunique() > 1
        for _, g in m.groupby("variant", sort=False):
            named = [c for c in NAMED_IDENTITY if g[c].nunique() > 1]
            name_run = g.duplicated([*named, "source"], keep=False)
            for r, run in zip(g.itertuples(index=False), name_run):
                row = r._asdict()
                parts = [str(row[c]) for c in named]
                if name_source:
                    parts.append(f"({row['source']})")
                if run:
                    parts.append(f"run {row['run_id'] or '(none)'}")
                suffix[tuple(row[c] for c in key)] = "".join(" " + p for p in parts)
    ends = [suffix[k] for k in zip(*(df[c] for c in key))]
    base = [f"{v} [{c}]" if c in ("cold", "warm") else v for v, c in zip(df["variant"], df["cache_state"])]
    df["label"] = [b + e for b, e in zip(base, ends)]
    df["series"] = [v + e for v, e in zip(df["variant"], ends)]


def first_point(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each model of each source directory at its first workload point (a sweep's
    figures compare points; the per-variant figures and the table compare results at one
    point). Skipped and failed rows stay. Applying it twice changes nothing."""
    keys = list(WORKLOAD_KEYS)
    keep = []
    for _, g in df.groupby(["source", "model"], sort=False):
        ok = g[g["status"] == "ok"] if "status" in g else g
        if ok.empty:
            keep.append(g)
            continue
        first = ok.iloc[0][keys]
        keep.append(g[(g["status"] != "ok") | (g[keys] == first).all(axis=1)])
    return pd.concat(keep) if keep else df


def label_order(labels) -> list[str]:
    """Stable order: the baseline variant first, then by name (cold before warm)."""
    return sorted(set(labels), key=lambda s: (s.split(" ")[0] != BASELINE[0], s))


def colours(labels) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20")
    return {lab: cmap(i % 20) for i, lab in enumerate(label_order(labels))}


def status_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The failed and skipped results: model, label, engine, status and the reason."""
    rows = summary[summary["status"] != "ok"][["model", "label", "engine", "status", "error"]].drop_duplicates()
    return rows.rename(columns={"label": "variant"}).fillna({"error": ""})

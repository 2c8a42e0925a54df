"""Comparing the measured runs of two results (runs.csv files or results directories): load them,
group them by result identity (bench.measure.schema.RESULT_KEY: model, family, weights, variant,
engine, device, dtype, cache state and workload point) and metric, and give each group a
regression verdict (bench.analysis.regress). Rows that differ in any identity column are never
pooled; the runs of one side are pooled across its invocations (run ids). The command line is
bench.cli.compare."""
from __future__ import annotations

import io
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from bench.analysis.console import NARROW
from bench.analysis.inputs import BadInput, check_results_csv
from bench.analysis.regress import compare_samples
from bench.measure.results import LOCK_NAME, lock_holder
from bench.measure.schema import (IDENTITY_DEFAULTS, POINT_METRICS, RESULT_KEY, WORKLOAD_KEYS, counted,
                                  fill_identity_columns, point_label)

DEFAULT_METRICS = ["ttft_ms", "tpot_ms", "prefill_ms", "e2e_ms", "peak_alloc_mb"]
KEYS = list(RESULT_KEY)
# Identity columns the table shows only when the compared rows differ in them.
OPTIONAL_SHOWN = ("family", "weights", "device", "dtype")


def load_runs(path: str | Path) -> pd.DataFrame:
    """The measured runs of a result that count (ok, no compilation or capture inside them)."""
    return counted(load_rows(path))


def load_rows(path: str | Path) -> pd.DataFrame:
    """Every row of a result's runs.csv (warm-ups, skipped and failed rows too), identity columns
    older versions did not write filled with their documented defaults."""
    p = Path(path)
    if p.is_dir():
        p = p / "runs.csv"
    holder = lock_holder(p.parent)
    if holder is not None:  # its rows so far are part of a sweep: a result not yet run would read as lost
        raise BadInput(f"{path} is being written by a run ({f'PID {holder}, ' if holder > 0 else ''}lock file "
                       f"{p.parent / LOCK_NAME}); compare it once the run has ended")
    if not p.is_file():
        raise BadInput(f"{path}: no runs.csv there")
    text = check_results_csv(p, "runs")
    try:
        # Text identity columns as text: a column of numbers (and empty cells) is no float ("1.0" != "1").
        df = pd.read_csv(io.StringIO(text), dtype={k: str for k, v in IDENTITY_DEFAULTS.items() if isinstance(v, str)})
    except (ValueError, pd.errors.ParserError) as e:  # what the check above did not foresee
        raise BadInput(f"{p}: not a readable runs.csv ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    # a skipped or failed row of a whole variant has no workload point (one of a point has)
    df["point_given"] = df[[k for k in WORKLOAD_KEYS if k != "loader" and k in df]].notna().all(axis=1)
    fill_identity_columns(df)  # columns older versions did not write: their documented defaults
    return df


def parse_where(text: str | None, flag: str) -> dict[str, str]:
    """'cache_state=warm,variant=c1 rinf' -> {column: value}; BadInput naming `flag` when it is
    not such a list of identity columns."""
    if text is None:
        return {}
    where: dict[str, str] = {}
    for part in (p for p in text.split(",") if p.strip()):
        column, sep, value = part.partition("=")
        column = column.strip()
        if not sep or column not in KEYS:
            raise BadInput(f"{flag} {part.strip()!r}: give identity COLUMN=VALUE pairs, e.g. cache_state=warm "
                           f"(columns: {', '.join(KEYS)})")
        if column in where:
            raise BadInput(f"{flag} names {column} twice")
        where[column] = value.strip()
    if not where:
        raise BadInput(f"{flag} is empty; give identity COLUMN=VALUE pairs, e.g. cache_state=warm")
    return where


def select(df: pd.DataFrame, where: dict[str, str], side: str, flag: str) -> pd.DataFrame:
    """The runs of `df` whose identity columns hold `where`'s values (compared as text, an empty
    cell as ''); BadInput naming the values there are when none does. No `where`: `df` as it is."""
    if not where:
        return df
    keep = pd.Series(True, index=df.index)
    for column, value in where.items():
        cells = df[column].map(lambda v: "" if pd.isna(v) else str(_native(v)))
        if value not in set(cells):
            raise BadInput(f"{flag} {column}={value}: the {side} has no such run ({column} there: "
                           f"{', '.join(sorted(set(cells))) or 'none'})")
        keep &= cells == value
    if not keep.any():
        raise BadInput(f"{flag}: no run of the {side} holds all of {', '.join(f'{k}={v}' for k, v in where.items())}")
    return df[keep]


def _groups(df: pd.DataFrame, keys: list[str]) -> dict:
    """{key tuple: rows} by `keys`; no keys (--across names every identity column): one group."""
    if not keys:
        return {(): df} if len(df) else {}
    return dict(list(df.groupby(keys)))


def _native(v):
    """A cell as JSON and the table take it (numpy scalars as Python ones)."""
    return v.item() if hasattr(v, "item") else v


def _single_valued(groups: dict, keys: list[str], across: list[str], side: str) -> None:
    """BadInput unless each group holds one value of every `across` column: rows that differ in
    an identity column are never pooled, --across or not."""
    for key, g in groups.items():
        for col in across:
            values = sorted(g[col].astype(str).unique())
            if len(values) > 1:
                result = (", ".join(f"{k} {v}" for k, v in list(zip(keys, key))[:3]) + ", ...") if key else "all its rows"
                raise BadInput(f"--across {col}: the {side} has {len(values)} {col} values ({', '.join(values[:4])}) "
                               f"for one result ({result}); pick one with --{side}-where {col}={values[0]}")


def _paired(b, c):
    """An --across column's cell: the value both sides share, or 'baseline -> candidate'."""
    return b if b == c else f"{b if b != '' else '-'} -> {c if c != '' else '-'}"


def _samples(rows: pd.DataFrame, metric: str) -> list[float]:
    """A result's samples of `metric`: one per run, or for a point metric one per run id (each of
    a point's rows holds the same measurement of the whole point)."""
    rows = rows.dropna(subset=[metric])
    return (rows.drop_duplicates("run_id") if metric in POINT_METRICS else rows)[metric].tolist()


def _lost_reason(key: dict, cand_rows: pd.DataFrame | None) -> str:
    """Why the candidate has no measured run of a result the baseline has: its skipped or failed
    row of that model, variant, engine and workload point, or else of the whole variant (a row
    with no point, load_rows' point_given), else that it did not run it."""
    if cand_rows is None or not len(cand_rows):
        return "not in the candidate"
    same = cand_rows["status"].isin(("failed", "skipped"))
    for col in ("model", "variant", "engine"):
        if col in key:
            same &= cand_rows[col].astype(str) == str(key[col])
    given = cand_rows["point_given"] if "point_given" in cand_rows else pd.Series(False, index=cand_rows.index)
    at_point = pd.Series(True, index=cand_rows.index)
    for col in WORKLOAD_KEYS:
        if col in key and col in cand_rows:
            at_point &= cand_rows[col].astype(str) == str(key[col])
    for hit in (cand_rows[same & given & at_point], cand_rows[same & ~given]):
        if len(hit):
            status, error = hit["status"].iloc[0], hit["error"].iloc[0] if "error" in hit else ""
            return f"{status} in the candidate" + (f": {error}" if isinstance(error, str) and error else "")
    return "not in the candidate"


def compare_runs(base: pd.DataFrame, cand: pd.DataFrame, metrics: list[str], alpha: float,
                 factor: float, min_samples: int = 5, across: tuple[str, ...] = (),
                 cand_rows: pd.DataFrame | None = None, cand_where: dict[str, str] | None = None) -> list[dict]:
    """A verdict per result and metric, and a `missing` one per result the baseline measured and
    the candidate did not (a gate that passed on what was left would hide a variant lost to a
    failure or a skip; `cand_rows`: every row of the candidate, to say why), of those the
    candidate's selection (`cand_where`, select's) could hold. `across`: identity
    columns in which the two sides may differ (the others pair their rows), e.g. engine and
    variant for a served endpoint against the in-process run it serves; a side must then hold
    one value of each per result, the verdict's column reads 'baseline value -> candidate value'
    where they differ, and its `across` holds {column: [baseline value, candidate value]}."""
    across = list(across)
    keys = [k for k in KEYS if k not in across]
    rows = []
    groups_b, groups_c = _groups(base, keys), _groups(cand, keys)
    _single_valued(groups_b, keys, across, "baseline")
    _single_valued(groups_c, keys, across, "candidate")
    for key in sorted(set(groups_b) & set(groups_c)):
        sides = {col: [_native(groups_b[key][col].iloc[0]), _native(groups_c[key][col].iloc[0])] for col in across}
        paired = {col: _paired(b, c) for col, (b, c) in sides.items()}
        for metric in metrics:
            if metric not in groups_b[key] or metric not in groups_c[key]:
                continue
            b, c = _samples(groups_b[key], metric), _samples(groups_c[key], metric)
            if not b and not c:
                continue
            v = compare_samples(b, c, metric, alpha=alpha, factor=factor, min_samples=min_samples)
            rows.append({**{k: _native(x) for k, x in zip(keys, key)}, **paired, "metric": metric, **asdict(v),
                         **({"across": sides} if across else {})})
    for key in sorted(set(groups_b) - set(groups_c)):
        identity = {k: _native(x) for k, x in zip(keys, key)}
        if any(col in identity and str(identity[col]) != value for col, value in (cand_where or {}).items()):
            continue  # left out of the candidate by --candidate-where, not lost
        g = groups_b[key]
        shown = {col: _native(g[col].iloc[0]) for col in across}
        rows.append({**identity, **shown, "metric": "-", "status": "missing", "ratio": math.nan,
                     "p_value": math.nan, "n_baseline": len(g), "n_candidate": 0, "baseline_median": math.nan,
                     "candidate_median": math.nan, "reason": _lost_reason({**identity, **shown}, cand_rows)})
    return rows


def _differs(rows: list[dict], col: str) -> bool:
    """Whether the compared rows differ in `col`: between results, or between the sides (--across)."""
    return len({str(r.get(col)) for r in rows}) > 1 or any(
        len({str(v) for v in r.get("across", {}).get(col, ())}) > 1 for r in rows)


def _point(r: dict) -> str:
    """The row's workload point; where --across pairs two points, 'baseline point -> candidate point'."""
    across = r.get("across", {})
    b, c = ({k: across[k][i] if k in across else r.get(k) for k in WORKLOAD_KEYS} for i in (0, 1))
    b, c = point_label(b), point_label(c)
    return b if b == c else f"{b} -> {c}"


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _cells(r: dict, extra: list[str]) -> dict[str, str]:
    """A verdict's identity cells and run counts by column heading (the optional identity
    columns where rows differ)."""
    return {"model": str(r["model"]), **{k: str(r[k]) for k in extra}, "variant": str(r["variant"]),
            "engine": str(r["engine"]), "cache": str(r["cache_state"]), "point": _point(r),
            "n b/c": f"{r['n_baseline']}/{r['n_candidate']}"}


def print_table(rows: list[dict], out=None, width: int = NARROW) -> None:
    """The verdicts as a table of at most `width` columns: an identity column (or the run
    counts) holding one value in every row is said once above the table instead."""
    from rich import box
    from rich.table import Table

    from bench.log import stdout_console

    extra = [k for k in OPTIONAL_SHOWN if _differs(rows, k)]
    cells = [_cells(r, extra) for r in rows]
    heads = list(cells[0]) if cells else []
    shared = [h for h in heads if h != "variant" and len({c[h] for c in cells}) == 1]
    shown = [h for h in heads if h not in shared]
    said = ", ".join(f"{cells[0][h]} runs (baseline/candidate)" if h == "n b/c" else f"{h} {cells[0][h]}"
                     for h in shared)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    identity = [h for h in shown if h != "n b/c"]
    numbers = [h for h in ("n b/c", "median b", "median c", "ratio", "p") if h not in shared]
    for h in [*identity, "metric"]:
        table.add_column(h, overflow="fold")
    for h in numbers:
        table.add_column(h, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    style = {"regression": "red", "missing": "red", "improvement": "green", "inconclusive": "yellow", "unchanged": ""}
    for r, c in zip(rows, cells):
        c = {**c, "median b": _fmt(r["baseline_median"]), "median c": _fmt(r["candidate_median"]),
             "ratio": "-" if math.isnan(r["ratio"]) else f"{r['ratio']:.3f}", "p": _fmt(r["p_value"], 2)}
        s = style[r["status"]]
        table.add_row(*[c[h] for h in identity], r["metric"], *[c[h] for h in numbers],
                      f"[{s}]{r['status']}[/]" if s else r["status"])
    console = stdout_console(file=out or sys.stdout, width=width)
    console.print(f"baseline vs candidate{': ' + said if said else ''}")
    console.print(table)
    console.print("ratio: candidate / baseline (Hodges-Lehmann estimate); p: one-sided Mann-Whitney U")

"""`python -m bench compare BASELINE CANDIDATE`: per (model, variant, engine, cache_state, metric),
compare the measured runs of two results (runs.csv files or results directories).

Exit codes: 0 no regression, 1 at least one regression, 2 bad input (missing file, mismatched
schema, nothing in common, or too few samples: inconclusive is never a pass).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from bench.regress import compare_samples
from bench.workload import POINT_DEFAULTS, fill_point_columns, point_label

DEFAULT_METRICS = ["ttft_ms", "tpot_ms", "prefill_ms", "e2e_ms", "peak_alloc_mb"]
KEYS = ["model", "variant", "engine", "cache_state", *POINT_DEFAULTS]
REQUIRED = {"model", "variant", "engine", "cache_state", "kind", "status"}


class BadInput(Exception):
    pass


def load_runs(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if p.is_dir():
        p = p / "runs.csv"
    if not p.is_file():
        raise BadInput(f"{path}: no runs.csv there")
    df = pd.read_csv(p, dtype={"cache_state": str, "engine": str})
    missing = REQUIRED - set(df.columns)
    if missing:
        raise BadInput(f"{p}: not a runs.csv (missing columns: {', '.join(sorted(missing))})")
    df["engine"] = df["engine"].fillna("hf")
    df["cache_state"] = df["cache_state"].fillna("none")
    fill_point_columns(df)
    return df[(df["kind"] == "measured") & (df["status"] == "ok")]


def compare_runs(base: pd.DataFrame, cand: pd.DataFrame, metrics: list[str], alpha: float,
                 factor: float, min_samples: int = 5) -> list[dict]:
    rows = []
    groups_b = dict(list(base.groupby(KEYS)))
    groups_c = dict(list(cand.groupby(KEYS)))
    for key in sorted(set(groups_b) & set(groups_c)):
        for metric in metrics:
            if metric not in groups_b[key] or metric not in groups_c[key]:
                continue
            b = groups_b[key][metric].dropna().tolist()
            c = groups_c[key][metric].dropna().tolist()
            if not b and not c:
                continue
            v = compare_samples(b, c, metric, alpha=alpha, factor=factor, min_samples=min_samples)
            rows.append({**dict(zip(KEYS, key)), "metric": metric, **asdict(v)})
    return rows


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def print_table(rows: list[dict], out=sys.stdout) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="baseline vs candidate (ratio = candidate/baseline, Hodges-Lehmann)")
    for col in ("model", "variant", "engine", "cache", "point", "metric", "n b/c", "median b", "median c", "ratio", "p",
                "verdict"):
        table.add_column(col)
    style = {"regression": "red", "improvement": "green", "inconclusive": "yellow", "unchanged": ""}
    for r in rows:
        s = style[r["status"]]
        table.add_row(r["model"], r["variant"], r["engine"], r["cache_state"], point_label(r), r["metric"],
                      f"{r['n_baseline']}/{r['n_candidate']}", _fmt(r["baseline_median"]),
                      _fmt(r["candidate_median"]), _fmt(r["ratio"]), _fmt(r["p_value"]),
                      f"[{s}]{r['status']}[/]" if s else r["status"])
    Console(file=out, width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline")
    ap.add_argument("candidate")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma list of runs.csv columns")
    ap.add_argument("--alpha", type=float, default=0.01, help="one-sided Mann-Whitney U significance level")
    ap.add_argument("--factor", type=float, default=1.10, help="flag only changes larger than this ratio")
    ap.add_argument("--min-samples", type=int, default=5, help="fewer measured runs on a side is inconclusive")
    ap.add_argument("--json", dest="json_path", help="write the verdicts here as JSON")
    args = ap.parse_args(argv)
    try:
        base, cand = load_runs(args.baseline), load_runs(args.candidate)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [m for m in metrics if m not in base.columns or m not in cand.columns]
        if unknown:
            raise BadInput(f"metric(s) not in both results: {', '.join(unknown)}")
        rows = compare_runs(base, cand, metrics, args.alpha, args.factor, args.min_samples)
        if not rows:
            raise BadInput("baseline and candidate have no (model, variant, engine, cache_state, workload point) "
                           "in common")
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("regression", "improvement", "unchanged",
                                                               "inconclusive")}
    verdict = ("regression" if counts["regression"] else "inconclusive" if counts["inconclusive"] else "pass")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"verdict": verdict, "counts": counts, "alpha": args.alpha,
                                                    "factor": args.factor, "comparisons": rows}, indent=2,
                                                   default=str))
    print(f"verdict: {verdict} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return {"regression": 1, "inconclusive": 2, "pass": 0}[verdict]

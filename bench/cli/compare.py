"""`vlm-bench compare BASELINE CANDIDATE`: the regression verdict between two results."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter

from pandas.api.types import is_numeric_dtype

from bench.cli import PROG, describe
from bench.errors import ArgumentParser, no_room, real_path
from bench.analysis.inputs import check_out_file
from bench.analysis.compare import (DEFAULT_METRICS, KEYS, BadInput, compare_runs, load_rows, parse_where,
                                    print_table, select)
from bench.measure.results import write_json
from bench.measure.schema import counted, point_label

_DETAILS = """\
Per result identity (model, family, weights, variant, engine, device, dtype, cache_state,
workload point: bench.measure.schema.RESULT_KEY) and metric, compare the measured runs of two
results (runs.csv files or results directories): a change is flagged when it is significant
(one-sided Mann-Whitney U at --alpha) and larger than --factor. --across pairs results that
differ in the columns it names (a served endpoint against the in-process run it serves).

A result the baseline measured and the candidate did not (skipped, failed or not run) is a
"missing" verdict, which fails the comparison as a regression does: a gate must not pass on
what was left of a sweep. --allow-missing lets a candidate measure fewer results.

exit codes:
  0  no regression, nothing missing
  1  at least one regression, or a result missing from the candidate (without --allow-missing)
  2  bad input (missing file, mismatched schema, nothing in common) or inconclusive (too few
     runs on a side for --min-samples or --alpha, or a value at or below zero; a line says
     which): inconclusive is never a pass"""


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"{PROG} compare", description=describe("compare") + "\n\n" + _DETAILS)
    ap.add_argument("baseline", metavar="BASELINE", help="runs.csv, or a results directory holding one")
    ap.add_argument("candidate", metavar="CANDIDATE", help="runs.csv, or a results directory holding one")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                    help=f"comma list of runs.csv columns (default: {','.join(DEFAULT_METRICS)})")
    ap.add_argument("--alpha", type=float, default=0.01,
                    help="one-sided Mann-Whitney U significance level (default: 0.01)")
    ap.add_argument("--factor", type=float, default=1.10,
                    help="flag only changes larger than this ratio (default: 1.10)")
    ap.add_argument("--min-samples", type=int, default=5,
                    help="fewer measured runs on a side is inconclusive (default: 5)")
    ap.add_argument("--across", metavar="COLUMNS",
                    help="comma list of identity columns the two sides may differ in; rows pair on the others, "
                         "e.g. engine,variant,weights,family,device,dtype for a served endpoint (run --endpoint) "
                         "against the in-process run of the model it serves, or cache_state (default: none: "
                         "every identity column pairs)")
    for side in ("baseline", "candidate"):
        ap.add_argument(f"--{side}-where", metavar="COLUMN=VALUE,...",
                        help=f"compare only the {side}'s runs holding these identity values, e.g. cache_state=warm "
                             f"(an in-process prefix run's warm results against a served run), or variant='c1 rinf' "
                             f"(one point of an endpoint sweep) (default: all)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="pass although the candidate lacks results the baseline has (still listed as missing; "
                         "default: such a result fails the comparison)")
    ap.add_argument("--json", dest="json_path", help="also write the verdicts here as JSON: a new or empty file, or "
                                                     "an earlier --json, which is replaced (default: none)")
    return ap


def _verdicts_file(path: str) -> bool:
    """Whether `path` holds what an earlier --json wrote, or nothing (an empty file, as mktemp
    makes): the only existing files it replaces. Not a regular file (a FIFO would block): no."""
    try:
        if not os.path.isfile(path):
            return False
        if os.path.getsize(path) == 0:
            return True
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 26))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"verdict", "counts", "alpha", "comparisons"} <= data.keys()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.json_path is not None:
            check_out_file(args.json_path, "--json", (args.baseline, args.candidate))
            if os.path.exists(args.json_path) and not _verdicts_file(args.json_path):
                raise BadInput(f"--json {args.json_path} exists and is no verdicts file of compare's; give a new "
                               "file (or an earlier --json, which is replaced)")
        if not (0 < args.alpha < 1) or not 1 <= args.factor < float("inf") or args.min_samples < 1:
            raise BadInput("--alpha must be between 0 and 1, --factor a finite number at least 1 and --min-samples "
                           "at least 1")
        base_where = parse_where(args.baseline_where, "--baseline-where")
        cand_where = parse_where(args.candidate_where, "--candidate-where")
        base = select(counted(load_rows(args.baseline)), base_where, "baseline", "--baseline-where")
        cand_rows = load_rows(args.candidate)
        cand = select(counted(cand_rows), cand_where, "candidate", "--candidate-where")
        metrics = list(dict.fromkeys(m.strip() for m in args.metrics.split(",") if m.strip()))  # each once
        if not metrics:
            raise BadInput(f"--metrics is empty; give runs.csv columns, e.g. {','.join(DEFAULT_METRICS)}")
        unknown = [m for m in metrics if m not in base.columns or m not in cand.columns]
        if unknown:
            raise BadInput(f"metric(s) not in both results: {', '.join(unknown)}")
        text = [m for m in metrics if m in KEYS or not (is_numeric_dtype(base[m]) and is_numeric_dtype(cand[m]))]
        if text:
            raise BadInput(f"--metrics {', '.join(text)}: not numbers (an identity or text column); give measured "
                           f"columns, e.g. {','.join(DEFAULT_METRICS)}")
        across = tuple(dict.fromkeys(c.strip() for c in (args.across or "").split(",") if c.strip()))
        if args.across is not None and not across:
            raise BadInput("--across is empty; give identity columns the sides may differ in, e.g. engine,variant")
        wrong = [c for c in across if c not in KEYS]
        if wrong:
            raise BadInput(f"--across {', '.join(wrong)}: not an identity column; choose from {', '.join(KEYS)}")
        rows = compare_runs(base, cand, metrics, args.alpha, args.factor, args.min_samples, across, cand_rows,
                            cand_where)
        # nothing compared: an error, unless the candidate lost (skipped, failed) what the baseline
        # has, which fails as missing; --allow-missing never passes a comparison of nothing
        lost_some = any(r["status"] == "missing" and r["reason"] != "not in the candidate" for r in rows)
        if (args.allow_missing or not lost_some) and not any(r["status"] != "missing" for r in rows):
            paired = [k for k in KEYS if k not in across]
            empty = [side for side, df in (("baseline", base), ("candidate", cand)) if df.empty]
            if empty:  # (what --across would pair does not matter then)
                raise BadInput(f"the {' and the '.join(empty)} {'have' if len(empty) == 2 else 'has'} no measured run "
                               "to compare (every row skipped, failed, a warm-up or one that compiled)")
            if not paired:
                raise BadInput("baseline or candidate has no measured run to compare")
            raise BadInput(f"baseline and candidate have no result ({', '.join(paired)}) in common"
                           + ("" if across else "; --across names columns they may differ in"))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("regression", "missing", "improvement", "unchanged",
                                                               "inconclusive")}
    lost = counts["missing"] and not args.allow_missing
    verdict = ("regression" if counts["regression"] else "missing" if lost
               else "inconclusive" if counts["inconclusive"] else "pass")
    if args.json_path:
        try:
            # through a symbolic link to its target, as a plain write would (an atomic one replaces the link)
            write_json(real_path(args.json_path), {"verdict": verdict, "counts": counts, "alpha": args.alpha,
                                                   "factor": args.factor, "comparisons": rows})
        except OSError as e:
            if no_room(e):  # exit 4, the one line naming the file (bench.cli.main)
                raise
            print(f"error: --json {args.json_path}: cannot write it ({e.strerror or e})", file=sys.stderr)
            return 2
    print(f"verdict: {verdict} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    reasons = Counter(r["reason"] for r in rows if r["status"] == "inconclusive")
    for reason, n in reasons.items():  # exit 2 says why, so a CI log shows what to change
        print(f"inconclusive: {reason} ({n} of {len(rows)} verdicts)")
    for r in rows:
        if r["status"] == "missing":
            print(f"missing: {r['variant']} {r['engine']} {r['cache_state']} {point_label(r)}: {r['reason']}"
                  + (" (--allow-missing)" if args.allow_missing else ""))
    return {"regression": 1, "missing": 1, "inconclusive": 2, "pass": 0}[verdict]

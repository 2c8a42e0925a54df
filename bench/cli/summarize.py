"""`vlm-bench summarize DIR`: rebuild summary.csv from runs.csv and env.json."""
from __future__ import annotations

import os
import sys

from bench.cli import PROG, describe
from bench.errors import ArgumentParser, not_a_file


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"{PROG} summarize",
                        description=describe("summarize")[:-1] + " and env.json (e.g. after an interrupted run, or "
                                    "when only runs.csv and env.json were copied off a machine). Runs (run_id) are "
                                    "summarised apart.")
    ap.add_argument("results_dir", metavar="RESULTS_DIR", help="a results directory with runs.csv and env.json")
    ap.add_argument("--pool-runs", action="store_true",
                    help="one summary per result across every run of the directory (default: one per run_id)")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from pathlib import Path

    from bench.analysis.inputs import BadInput, check_results_csv, read_env_config
    from bench.errors import UsageError
    from bench.measure.results import LOCK_NAME, lock_holder, read_runs, summary_problem, write_summary
    from bench.measure.schema import counts_in_summary
    from bench.run.summary import ValidityRule, summarize_runs

    out = Path(args.results_dir)
    try:
        holder = lock_holder(out)
        if holder is not None:  # its summary.csv is the run's to write; one written now would miss rows
            raise BadInput(f"{out} is being written by a run ({f'PID {holder}, ' if holder > 0 else ''}lock file "
                           f"{out / LOCK_NAME}); summarize it once the run has ended")
        names = ("runs.csv", "env.json")
        wrong = [f"its {name} is {problem}" for name in names if (problem := not_a_file(out / name))]
        if wrong:  # there, but no file (a directory, say); one unreadable: said where it is read
            raise BadInput(f"{out}: {' and '.join(wrong)}")
        missing = [name for name in names if not os.path.lexists(out / name)]
        if missing:
            raise BadInput(f"{out} is not a results directory: no {' or '.join(missing)}")
        problem = summary_problem(out)
        if problem:
            raise BadInput(problem)
        if not os.access(out, os.W_OK | os.X_OK):  # summary.csv is replaced through a file beside it
            raise BadInput(f"{out} is not writable: summary.csv cannot be written there")
        saved = read_env_config(out / "env.json")
        check_results_csv(out / "runs.csv", "runs")
        # The summary reads three of the run's settings; the rest (whichever version of the
        # harness wrote them) do not affect it.
        try:
            named = saved.get("runs_named")  # endpoint mode's --duration (bench.serve.endpoint_run)
            named = tuple(named) if isinstance(named, list) and len(named) == 2 and \
                all(isinstance(v, str) for v in named) else None
            rule = ValidityRule(*(saved[k] for k in ("num_runs", "min_seconds", "max_cv")), runs_named=named)
        except KeyError as e:
            raise BadInput(f"{out / 'env.json'}: its run config is not valid here (no {e.args[0]})") from None
        except UsageError as e:
            raise BadInput(f"{out / 'env.json'}: its run config is not valid here ({e})") from None
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = read_runs(out / "runs.csv")
    if args.pool_runs:  # one summary per result across every run of the directory (run_id left empty)
        rows = [{**r, "run_id": ""} for r in rows]
    path = write_summary(out, summarize_runs(rows, rule))
    counted = sum(map(counts_in_summary, rows))
    other = len(rows) - counted
    print(f"wrote {path} from {counted} measured runs"
          + (f" (and {other} other rows of runs.csv: warm-ups, runs that compiled, skipped or failed)" if other else ""))
    return 0

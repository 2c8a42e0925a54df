"""`vlm-bench summarize DIR`: rebuild summary.csv from runs.csv and env.json."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Rebuild a results directory's summary.csv from its runs.csv and env.json (e.g. after a
    run was interrupted, or when only runs.csv was copied off a machine). Runs (run_id) are
    summarised apart; --pool-runs pools every run's rows of one result."""
    import dataclasses
    from pathlib import Path

    from bench.analysis.inputs import BadInput, check_results_csv, read_env_config
    from bench.errors import UsageError
    from bench.run.config import config_class
    from bench.measure.results import read_runs, write_summary
    from bench.run.runner import summarize_runs

    pool = "--pool-runs" in argv
    argv = [a for a in argv if a != "--pool-runs"]
    if len(argv) != 1 or not (Path(argv[0]) / "runs.csv").is_file() or not (Path(argv[0]) / "env.json").is_file():
        print("usage: python -m bench summarize RESULTS_DIR [--pool-runs] (with runs.csv and env.json)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    try:
        saved = read_env_config(out / "env.json")
        check_results_csv(out / "runs.csv", "runs")
        RunConfig = config_class()
        known = {f.name for f in dataclasses.fields(RunConfig)}
        # Options another version of the harness had (added or since removed) do not affect summaries.
        try:
            cfg = RunConfig(**{k: v for k, v in saved.items() if k in known})
        except (UsageError, TypeError, ValueError) as e:
            raise BadInput(f"{out / 'env.json'}: its run config is not valid here ({e})") from None
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = read_runs(out / "runs.csv")
    if pool:  # one summary per result across every run of the directory (run_id left empty)
        rows = [{**r, "run_id": ""} for r in rows]
    path = write_summary(out, summarize_runs(rows, cfg))
    print(f"wrote {path} from {len(rows)} runs")
    return 0

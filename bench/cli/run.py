"""`vlm-bench run` (and `python vila_prefix_benchmark.py`): measure variants, write a results directory.

Exit codes (bench.run.config.EXIT_CODES): 0 all measured, 1 some variant or point failed, 2 usage
error, 3 nothing measured, 4 no space left while writing (rows kept), 130 interrupted (finished rows
kept)."""
from __future__ import annotations

import shlex
import sys

from bench.cli import PROG, describe
from bench.quiet import quiet_libraries


def parser(prog: str = f"{PROG} run"):
    quiet_libraries()
    from bench.run.config import build_parser

    return build_parser(prog=prog, description=describe("run")[:-1] + " (runs.csv, summary.csv, env.json). "
                        "`--endpoint URL --model NAME` measures an OpenAI-compatible server instead "
                        f"(`{prog} --endpoint URL --help`).")


def main(argv: list[str] | None = None, prog: str = "vila_prefix_benchmark.py") -> int:
    """Run the benchmark; `prog` is the command it was called as (its --help and env.json's command)."""
    quiet_libraries()  # before the run config imports the model libraries
    from bench.analysis.console import print_summary
    from bench.run.config import config_from_args
    from bench.errors import UsageError

    argv = sys.argv[1:] if argv is None else argv
    from bench.cli.endpoint import wants_endpoint

    if wants_endpoint(argv):  # a server measured as its client
        from bench.cli.endpoint import main as endpoint

        return endpoint(argv, prog)
    try:
        cfg = config_from_args(argv, parser(prog))
        from bench.run.runner import Benchmark

        bench = Benchmark(cfg, shlex.join([*prog.split(), *argv]))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from bench.run.interrupt import signals_interrupt

        with signals_interrupt():  # Ctrl-C and SIGTERM (a CI job's timeout) alike
            out_dir = bench.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are in {bench.out_dir}/runs.csv", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        # this invocation's results (with --append the directory holds earlier runs' too: in summary.csv)
        summary = bench.summary_rows()
        mine = [r for r in summary if r.get("run_id") == bench.run_id]
        earlier = len({r.get("run_id") for r in summary} - {bench.run_id})
        print_summary(mine, out_dir, bench.source.weights, wide=cfg.wide, earlier_runs=earlier)
    except Exception as e:  # noqa: BLE001 - the rows are in runs.csv; the exit code still tells
        print(f"warning: no summary printed ({e.__class__.__name__}: {e})", file=sys.stderr)
    code = bench.exit_code()
    if code == 3:
        print("error: nothing measured: every variant was skipped or failed (reasons in runs.csv)", file=sys.stderr)
    elif code == 1:
        print("warning: some variants or points failed (reasons in runs.csv)", file=sys.stderr)
    return code

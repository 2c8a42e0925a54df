"""`vlm-bench ci-bench DIR`: the tiny CPU benchmark our own CI gates on, and its gate settings (one place)."""
from __future__ import annotations

import shlex
import textwrap

from bench.cli import PROG, describe
from bench.errors import ArgumentParser, UsageError

# One CPU thread and --calibrate: every request is timed next to a fixed reference workload
# (bench.measure.calibration) and the gate compares the ratios, so another process on the
# machine slows both sides of each ratio alike (tests/test_ci_gate.py runs it beside a CPU
# burner, and checks that a +30% per-token slowdown is still caught).
CI_BENCH_ARGS = [
    "--preset", "tiny-vila", "--device", "cpu", "--variants", "fp16,prefix", "--num-runs", "12",
    "--min-seconds", "0", "--max-new-tokens", "32", "--warmup", "2", "--no-fidelity", "--cpu-threads", "1",
    "--calibrate", "--text-prompt", "What is shown in this image?",
]
CI_GATE_METRICS = "ttft_rel,tpot_rel"
# Beside a CPU burner (2 cores) A/A pairs measured tpot_rel ratios of 0.99-1.17 and a +30% slowdown
# (30% more decode forwards) 1.24-1.59; quiet, the same slowdown measured 1.23-1.33.
CI_GATE_FACTOR = 1.2
BASELINE_DIR = "results/ci-baseline"


def parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog=f"{PROG} ci-bench",
        description=f"{describe('ci-bench')[:-1]}, the same as:\n  {PROG} run {shlex.join(CI_BENCH_ARGS)} "
                    "--append --output-dir OUTPUT_DIR",
        epilog=textwrap.fill(f"The gate compares {CI_GATE_METRICS} with {BASELINE_DIR} and flags slowdowns "
                             f"larger than x{CI_GATE_FACTOR}. Running it twice into one new directory makes a "
                             "baseline.", 79))
    ap.add_argument("output_dir", metavar="OUTPUT_DIR", help="results directory (new, or one written by ci-bench: "
                                                             "the run is appended)")
    return ap


def main(argv: list[str]) -> int:
    """Run the tiny CPU benchmark CI gates on (settings above)."""
    args = parser().parse_args(argv)
    if not args.output_dir.strip():
        raise UsageError("OUTPUT_DIR is empty; give the results directory to write")
    from bench.cli.run import main as run_main

    return run_main([*CI_BENCH_ARGS, "--append", "--output-dir", args.output_dir], prog=f"{PROG} run")

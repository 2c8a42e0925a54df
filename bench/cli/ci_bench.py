"""`vlm-bench ci-bench DIR`: the tiny CPU benchmark our own CI gates on, and its gate settings (one place)."""
from __future__ import annotations

import shlex
import textwrap

from bench.cli import PROG, describe
from bench.errors import ArgumentParser

CI_BENCH_ARGS = [
    "--preset", "tiny-vila", "--device", "cpu", "--variants", "fp16,prefix", "--num-runs", "12",
    "--min-seconds", "0", "--max-new-tokens", "32", "--warmup", "2", "--no-fidelity",
    "--text-prompt", "What is shown in this image?",
]
# Gross regressions only: a broken KV cache or per-token work multiplies these; machine noise does not.
CI_GATE_METRICS = "ttft_ms,tpot_ms"
CI_GATE_FACTOR = 1.5
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
    from bench.cli.run import main as run_main

    return run_main([*CI_BENCH_ARGS, "--append", "--output-dir", args.output_dir], prog=f"{PROG} run")

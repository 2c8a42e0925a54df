"""`vlm-bench ci-bench DIR`: the tiny CPU benchmark our own CI gates on, and its gate settings (one place)."""
from __future__ import annotations

import sys


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
CI_GATE_FACTOR = 1.25  # beside a CPU burner A/A pairs measured up to 1.17; the +30% slowdown 1.37-1.65
BASELINE_DIR = "results/ci-baseline"


def main(argv: list[str]) -> int:
    """Run the tiny CPU benchmark CI gates on (settings above)."""
    from bench.cli.run import main as run_main

    if len(argv) != 1:
        print("usage: python -m bench ci-bench OUTPUT_DIR", file=sys.stderr)
        return 2
    # --append: a baseline is refreshed by running this twice into one directory (README)
    return run_main([*CI_BENCH_ARGS, "--append", "--output-dir", argv[0]])

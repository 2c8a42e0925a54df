"""`vlm-bench ci-bench DIR`: the tiny CPU benchmark our own CI gates on, and its gate settings (one place)."""
from __future__ import annotations

import sys


CI_BENCH_ARGS = [
    "--preset", "tiny-vila", "--device", "cpu", "--variants", "fp16,prefix", "--num-runs", "12",
    "--min-seconds", "0", "--max-new-tokens", "32", "--warmup", "2", "--no-fidelity",
    "--text-prompt", "What is shown in this image?",
]
# Gross regressions only: a broken KV cache or per-token work multiplies these; machine noise does not.
CI_GATE_METRICS = "ttft_ms,tpot_ms"
CI_GATE_FACTOR = 1.5
BASELINE_DIR = "results/ci-baseline"


def main(argv: list[str]) -> int:
    """Run the tiny CPU benchmark CI gates on (settings above)."""
    from bench.cli.run import main as run_main

    if len(argv) != 1:
        print("usage: python -m bench ci-bench OUTPUT_DIR", file=sys.stderr)
        return 2
    # --append: a baseline is refreshed by running this twice into one directory (README)
    return run_main([*CI_BENCH_ARGS, "--append", "--output-dir", argv[0]])

#!/usr/bin/env python
"""Seed-compatible entry point:

    python vila_prefix_benchmark.py --num-runs 10 --model-path DIR --image-path IMG \
        --text-prompt "..." --conv-mode vicuna_v1 [--variants fp16,prefix ...]

With no arguments it runs a tiny VILA-architecture preset (random weights) on the demo image.
"""
import sys

if __name__ == "__main__":
    try:
        from bench.cli import run_main

        code = run_main()
    except KeyboardInterrupt:  # outside the run's own handling (its imports, its last printing)
        print("\ninterrupted", file=sys.stderr)
        code = 130
    sys.exit(code)

#!/usr/bin/env python
"""Seed-compatible entry point:

    python vila_prefix_benchmark.py --num-runs 10 --model-path DIR --image-path IMG \
        --text-prompt "..." --conv-mode vicuna_v1 [--variants fp16,prefix ...]

With no arguments it runs a tiny VILA-architecture preset (random weights) on the demo image.
"""
from bench.cli import entry, run_main

if __name__ == "__main__":
    entry(run_main)

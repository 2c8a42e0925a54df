"""Counting compilation and CUDA-graph capture: the one-time work that must never fall inside a
measured run (bench.run's warm-up covers every shape; a measured row that met any is recorded
with its count and left out of the summary).

Compilations are torch.compile's (TorchDynamo's `unique_graphs` counter: one per graph it
compiles, recompilations for new shapes included, with inductor's autotuning inside them).
Captures are counted by every place that captures a CUDA graph (`note_capture`): torch has no
counter for those. (Hand-written: no library counts both.)
"""
from __future__ import annotations

import sys

_captures = 0


def note_capture() -> None:
    """Called once per CUDA graph captured."""
    global _captures
    _captures += 1


def _compilations() -> int:
    utils = sys.modules.get("torch._dynamo.utils")  # never imported just to read zero
    if utils is None:
        return 0
    return int(utils.counters["stats"].get("unique_graphs", 0))


def count() -> int:
    """Compilations + captures so far in this process; a timed interval's is the difference."""
    return _compilations() + _captures

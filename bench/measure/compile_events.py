"""Counting compilation and CUDA-graph capture: the one-time work that must never fall inside a
measured run (bench.run's warm-up covers every shape; a measured row that met any is recorded
with its count and left out of the summary).

Compilations are torch.compile's (TorchDynamo's `unique_graphs` counter: one per graph it
compiles, recompilations for new shapes included, with inductor's autotuning inside them).
Triton JIT compilations outside torch.compile (our int4 kernels, gemlite's autotuning, which
compiles each configuration it tries for a new shape) are counted by Triton's post-compile hook
(`triton.knobs.runtime.jit_post_compile_hook`, Triton >= 3.4), set once Triton is imported and
chained to any hook set before. Captures are counted by every place that captures a CUDA graph
(`note_capture`): torch has no counter for those. Autotuning that compiles nothing new (a Triton
autotuner benchmarking its compiled configurations for a new row count) is counted by the
module that runs it, through `add_counter`. (Hand-written: no library counts all of these.)
"""
from __future__ import annotations

import sys

_captures = 0
_counters: dict[str, object] = {}  # name -> () -> int: one-time work counted by the module that runs it
_triton_compiles = 0
_triton_hooked = False


def note_capture() -> None:
    """Called once per CUDA graph captured."""
    global _captures
    _captures += 1


def _compilations() -> int:
    utils = sys.modules.get("torch._dynamo.utils")  # never imported just to read zero
    if utils is None:
        return 0
    return int(utils.counters["stats"].get("unique_graphs", 0))


def add_counter(name: str, counter) -> None:
    """Count what `counter()` (a running total) counts as one-time work too (once per name)."""
    _counters.setdefault(name, counter)


def _hook_triton() -> None:
    """Count Triton's JIT compilations from now on, once Triton is imported (never imported here)."""
    global _triton_hooked
    triton = sys.modules.get("triton")
    knobs = getattr(triton, "knobs", None)
    if _triton_hooked or knobs is None:  # not imported yet, or a Triton without knobs (< 3.4)
        return
    previous = knobs.runtime.jit_post_compile_hook

    def counted(*args, **kwargs):
        global _triton_compiles
        _triton_compiles += 1
        return previous(*args, **kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = counted
    _triton_hooked = True


def count() -> int:
    """Compilations (torch.compile's and Triton's) + captures so far in this process; a timed
    interval's is the difference."""
    _hook_triton()
    return _compilations() + _triton_compiles + _captures + sum(int(c()) for c in _counters.values())

"""Capturing a CUDA graph, the one way every capture here goes (the graph engines, int4 kernels,
the int4 prefetch, kernel timing): torch.cuda.graph with the garbage collector off.

A CUDA graph destroyed while another is being captured breaks that capture: destroying an
executable graph is not permitted while a stream captures in CUDA's default (global) capture
mode, torch warns "operation not permitted when stream is capturing (function reset)", and the
graph being captured is left without one ("Called CUDAGraph::replay without a preceding
successful capture"). Graphs held by garbage in reference cycles (an engine a finished variant or
a fidelity probe no longer uses, with its decode, prefill and prefetch graphs) are destroyed by
whichever collection frees them, and torch.cuda.graph no longer collects before it captures
(torch.compiler.config.force_cudagraph_gc is off by default). On the H100 an awq4+prefix run of
llava-1.5-7b after awq4 failed so: 36 graphs destroyed during the fidelity probe's first capture.
With the collector off while a graph is captured, such garbage waits for the next collection.
"""
from __future__ import annotations

import contextlib
import gc

import torch


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, **graph_options):
    """`with capturing(graph, pool=..., stream=...):` torch.cuda.graph(graph, **graph_options),
    no garbage collected inside (the module docstring)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, **graph_options):
            yield
    finally:
        if was_enabled:
            gc.enable()

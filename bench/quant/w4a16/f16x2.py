"""The project's f16x2 Triton GEMV (bench.quant.triton_f16x2) on the layer's packed weight, for one
row (a batch-1 decode step): `triton-f16x2` (one program per block of weight rows, all of K) and
`triton-f16x2-splitk` (K split in shares added by fp32 atomics). They hold no weight of their own.

A call is one registered op (vlm_bench::int4_f16x2_mm), which torch.compile keeps in its graph as
one opaque call. Both autotune on the first call at each shape (host-synchronized), so a layer
given one is called once when it is chosen (tunes_per_rows), before any capture; a tuning that
still falls inside a measured run is counted as one-time work (compile_events). They read the
tiles triton-tiles reads, and are its kernel class with their own limits.
"""
from __future__ import annotations

import torch

from bench.quant.w4a16.tiles import Tiles, tiles_op


class F16x2(Tiles):
    max_rows = 1  # a GEMV of one row (more run row by row): measured at one row only
    family = "triton-f16x2"
    module, counter = "triton_f16x2", "int4 f16x2 autotuning"
    op = tiles_op("int4_f16x2_mm", module, counter, "f16x2_mm")

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        why = super().unavailable(device, dtype)
        if why is None and dtype != torch.float16:
            why = f"{self.name} computes in f16x2 (float16 activations), not {dtype}"
        return why

    def shape_unsupported(self, layer) -> str | None:
        if why := super().shape_unsupported(layer):
            return why
        if layer.group_size % 128:
            return f"{self.name} takes groups of a multiple of 128 inputs, not {layer.group_size}"
        if layer.scale_and_zero.dtype != torch.float16:
            return f"{self.name} reads float16 scales and zeros, not {layer.scale_and_zero.dtype}"
        return None

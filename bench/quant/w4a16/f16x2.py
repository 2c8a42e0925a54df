"""The project's f16x2 Triton GEMV (bench.quant.triton_f16x2) on the layer's packed weight, for one
row (a batch-1 decode step): `triton-f16x2` (one program per block of weight rows, all of K) and
`triton-f16x2-splitk` (K split in shares added by fp32 atomics). They hold no weight of their own.

A call is one registered op (vlm_bench::int4_f16x2_mm), which torch.compile keeps in its graph as
one opaque call. Both autotune on the first call at each shape (host-synchronized), so a layer
given one is called once when it is chosen (tunes_per_rows), before any capture; a tuning that
still falls inside a measured run is counted as one-time work (compile_events).
"""
from __future__ import annotations

import torch

from bench.quant.w4a16.base import W4A16Kernel, cuda_half_unavailable, triton_module


def _module():
    """(bench.quant.triton_f16x2, None) or (None, why Triton cannot run it)."""
    return triton_module("triton_f16x2", "int4 f16x2 autotuning")


@torch.library.custom_op("vlm_bench::int4_f16x2_mm", mutates_args=())
def int4_f16x2_mm(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
                  group_size: int, split_k: bool) -> torch.Tensor:
    return _module()[0].f16x2_mm(x, packed, scale_and_zero, out_features, group_size, split_k)


@int4_f16x2_mm.register_fake
def _(x, packed, scale_and_zero, out_features, group_size, split_k):
    return x.new_empty(x.shape[0], out_features)


class F16x2(W4A16Kernel):
    tunes_per_rows = True
    max_rows = 1  # a GEMV of one row (more run row by row): measured at one row only

    def __init__(self, split_k: bool):
        self.split_k = split_k
        self.name = "triton-f16x2-splitk" if split_k else "triton-f16x2"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        why = cuda_half_unavailable(self.name, device, dtype) or _module()[1]
        if why is None and dtype != torch.float16:
            why = f"{self.name} computes in f16x2 (float16 activations), not {dtype}"
        return why

    def shape_unsupported(self, layer) -> str | None:
        if not layer.published_layout:
            return f"{self.name} reads tinygemm's published tile layout, which this build's packer does not write"
        if layer.group_size % 128:
            return f"{self.name} takes groups of a multiple of 128 inputs, not {layer.group_size}"
        if layer.scale_and_zero.dtype != torch.float16:
            return f"{self.name} reads float16 scales and zeros, not {layer.scale_and_zero.dtype}"
        return None

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vlm_bench.int4_f16x2_mm(x.contiguous(), layer.packed, layer.scale_and_zero,
                                                 layer.out_features, layer.group_size, self.split_k)

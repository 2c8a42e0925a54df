"""The project's own Triton W4A16 kernels (bench.quant.triton_w4a16) on the layer's packed weight:
`triton-tiles` (one program per block of weight rows, all of K) and `triton-tiles-splitk` (K split
in shares added by fp32 atomics). They hold no weight of their own (state_key None).

A call is one registered op (vlm_bench::int4_tiles_mm), which torch.compile keeps in its graph as
one opaque call, as it keeps gemlite's. Both autotune on the first call at each shape and row
block (host-synchronized), so a layer given one is called once per row count when it is chosen
(tunes_per_rows), before any capture; a tuning that still falls inside a measured run is counted
as one-time work (compile_events).
"""
from __future__ import annotations

import torch

from bench.quant.w4a16.base import W4A16Kernel, cuda_half_unavailable, triton_module


def _module():
    """(bench.quant.triton_w4a16, None) or (None, why Triton cannot run it)."""
    return triton_module("triton_w4a16", "int4 tiles autotuning")


@torch.library.custom_op("vlm_bench::int4_tiles_mm", mutates_args=())
def int4_tiles_mm(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
                  group_size: int, split_k: bool) -> torch.Tensor:
    return _module()[0].tiles_mm(x, packed, scale_and_zero, out_features, group_size, split_k)


@int4_tiles_mm.register_fake
def _(x, packed, scale_and_zero, out_features, group_size, split_k):
    return x.new_empty(x.shape[0], out_features)


class Tiles(W4A16Kernel):
    tunes_per_rows = True

    def __init__(self, split_k: bool):
        self.split_k = split_k
        self.name = "triton-tiles-splitk" if split_k else "triton-tiles"

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return cuda_half_unavailable(self.name, device, dtype) or _module()[1]

    def shape_unsupported(self, layer) -> str | None:
        if not layer.published_layout:
            return f"{self.name} reads tinygemm's published tile layout, which this build's packer does not write"
        return None

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vlm_bench.int4_tiles_mm(x.contiguous(), layer.packed, layer.scale_and_zero,
                                                 layer.out_features, layer.group_size, self.split_k)

"""The project's own Triton W4A16 kernels (bench.quant.triton_w4a16) on the layer's packed weight:
`triton-tiles` (one program per block of weight rows, all of K) and `triton-tiles-splitk` (K split
in shares added by fp32 atomics). They hold no weight of their own (state_key None).

A call is one registered op (vlm_bench::int4_tiles_mm), which torch.compile keeps in its graph as
one opaque call, as it keeps gemlite's. Both autotune on the first call at each shape and row
block (host-synchronized), so a layer given one is called once per row count when it is chosen
(tunes_per_rows), before any capture; a tuning that still falls inside a measured run is counted
as one-time work (compile_events). `Tiles` and `tiles_op` also serve the other kernels on these
tiles (bench.quant.w4a16.f16x2).
"""
from __future__ import annotations

import torch

from bench.quant.w4a16.base import W4A16Kernel, cuda_half_unavailable, triton_module


def tiles_op(name: str, module: str, counter: str, function: str):
    """Register vlm_bench::`name`, a call of bench.quant.`module`.`function` (x, packed,
    scale_and_zero, out_features, group_size, split_k) -> [rows, out_features], its module loaded
    on first use with its tuning counted as `counter`; torch.ops.vlm_bench.`name`, what the
    layers call (and torch.compile keeps whole)."""
    @torch.library.custom_op(f"vlm_bench::{name}", mutates_args=())
    def op(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
           group_size: int, split_k: bool) -> torch.Tensor:
        return getattr(triton_module(module, counter)[0], function)(x, packed, scale_and_zero, out_features,
                                                                   group_size, split_k)

    @op.register_fake
    def _(x, packed, scale_and_zero, out_features, group_size, split_k):
        return x.new_empty(x.shape[0], out_features)

    return getattr(torch.ops.vlm_bench, name)


class Tiles(W4A16Kernel):
    tunes_per_rows = True
    family = "triton-tiles"  # the kernel's name (and, split K, the name + "-splitk")
    module, counter = "triton_w4a16", "int4 tiles autotuning"  # its Triton module (base.triton_module)
    op = tiles_op("int4_tiles_mm", module, counter, "tiles_mm")

    def __init__(self, split_k: bool):
        self.split_k = split_k
        self.name = f"{self.family}-splitk" if split_k else self.family

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return cuda_half_unavailable(self.name, device, dtype) or triton_module(self.module, self.counter)[1]

    def shape_unsupported(self, layer) -> str | None:
        if not layer.published_layout:
            return f"{self.name} reads tinygemm's published tile layout, which this build's packer does not write"
        return None

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.contiguous(), layer.packed, layer.scale_and_zero, layer.out_features, layer.group_size,
                       self.split_k)

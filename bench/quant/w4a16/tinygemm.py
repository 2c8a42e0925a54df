"""PyTorch's tinygemm int4 kernel (`_weight_int4pack_mm`, what torchao's int4 tensors call) on
the layer's own packed weight; its CPU twin on the CPU."""
from __future__ import annotations

import torch

from bench.quant.w4a16.base import W4A16Kernel


class Tinygemm(W4A16Kernel):
    name = "tinygemm"

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        sz = layer.scale_and_zero
        x = x.to(sz.dtype)
        if x.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x, layer.packed, layer.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), layer.packed, layer.group_size, sz)

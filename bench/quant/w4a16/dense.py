"""Dequantize + dense GEMM: Int4Linear's path for many rows (prefill), as a kernel choice for
few rows too."""
from __future__ import annotations

import torch

from bench.quant.w4a16.base import W4A16Kernel


class Dense(W4A16Kernel):
    name = "dense"
    reads_dense_copy = True

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.dense_forward(x)

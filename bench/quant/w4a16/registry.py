"""Every W4A16 kernel Int4Linear can run, by name (a kernel is one module plus a line here)."""
from __future__ import annotations

from bench.quant.w4a16.base import W4A16Kernel
from bench.quant.w4a16.dense import Dense
from bench.quant.w4a16.f16x2 import F16x2
from bench.quant.w4a16.fbgemm import Fbgemm
from bench.quant.w4a16.gemlite import Gemlite
from bench.quant.w4a16.marlin import Marlin
from bench.quant.w4a16.tiles import Tiles
from bench.quant.w4a16.tinygemm import Tinygemm

DEFAULT_KERNEL = "tinygemm"  # what Int4Linear runs up to dense_rows unless told otherwise
KERNELS: dict[str, W4A16Kernel] = {k.name: k for k in (
    Tinygemm(),
    Dense(),
    Gemlite("GEMV"),
    Gemlite("GEMV_REVSPLITK"),
    Gemlite("GEMV_SPLITK"),
    Gemlite("GEMM_SPLITK"),
    Gemlite("GEMM"),
    Fbgemm("bf16i4bf16_rowwise", shuffled=False),
    Fbgemm("bf16i4bf16_shuffled", shuffled=True),
    Tiles(split_k=False),
    Tiles(split_k=True),
    F16x2(split_k=False),
    F16x2(split_k=True),
    Marlin(),
)}

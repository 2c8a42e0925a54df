"""Triton dequantizer for tinygemm-packed int4 weights (the dense prefill path on CUDA).

PyTorch's tinygemm kernel (`_weight_int4pack_mm`, what torchao's int4 tensors call) is fast at a
few rows and slow at many, and neither PyTorch nor torchao can turn its packed weight back into a
dense one (torchao's Int4TilePackedTo4dTensor has no dequantize). This kernel does, in one pass:
each program takes one 8 x 128 tile, reads its packed words, and writes the tile row-major
(coalesced), finding each element's nibble through the tile permutation that
bench.quant.int4.KernelLayout learnt from the packer. One warp per tile measured fastest of
1, 2, 4 and 8 on the H200 (a scratch sweep; the kept numbers are `dequantize_only` in
results/h200/int4_kernels_*.csv).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TINYGEMM_MID = 8


@triton.jit
def _dequant_tinygemm_kernel(p_ptr, sz_ptr, inv_ptr, w_ptr, N, K, G: tl.constexpr, MID: tl.constexpr):
    t = tl.program_id(0)
    KT = K // 128
    nt = t // KT
    kt = t % KT
    pos = tl.arange(0, 1024)  # row-major position inside the 8 x 128 tile
    m = tl.load(inv_ptr + pos)  # which nibble of the tile's packed words holds it
    word = tl.load(p_ptr + t * 128 + m // 8)
    q = ((word >> ((m % 8) * 4)) & 15).to(tl.float32)
    n = nt * 8 + pos // 128
    k = kt * 128 + pos % 128
    sz = ((k // G) * N + n) * 2  # scale_and_zero is [K/G, N, 2]
    s = tl.load(sz_ptr + sz).to(tl.float32)
    z = tl.load(sz_ptr + sz + 1).to(tl.float32)
    tl.store(w_ptr + n * K + k, ((q - MID) * s + z).to(w_ptr.dtype.element_ty))


def dequantize_tinygemm(packed: torch.Tensor, scale_and_zero: torch.Tensor, tile_inverse: torch.Tensor,
                        out: torch.Tensor, group: int) -> torch.Tensor:
    """Write the dense weight into `out` ([N, K], the activation dtype)."""
    n, k = out.shape
    _dequant_tinygemm_kernel[((n // 8) * (k // 128),)](packed, scale_and_zero, tile_inverse, out, n, k, G=group,
                                                      MID=TINYGEMM_MID, num_warps=1)
    return out


def dequantize_traceable(packed: torch.Tensor, scale_and_zero: torch.Tensor, tile_inverse: torch.Tensor, n: int,
                         k: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense [n, k] weight in a new tensor, written so torch.compile traces it: inductor then
    launches the kernel from its generated code (a few microseconds of host time) instead of
    calling back into Python per linear (the opaque custom op + graph replay of bench.quant.int4
    cost ~45 us of host time each; a host-bound prefill makes 128 of them for vila1.5-3b)."""
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    torch.library.wrap_triton(_dequant_tinygemm_kernel)[((n // 8) * (k // 128),)](
        packed, scale_and_zero, tile_inverse, out, n, k, G=group, MID=TINYGEMM_MID, num_warps=1)
    return out


"""Triton dequantizers for tinygemm-packed int4 weights (the dense prefill path on CUDA).

PyTorch's tinygemm kernel (`_weight_int4pack_mm`, what torchao's int4 tensors call) is fast at a
few rows and slow at many, and neither PyTorch nor torchao can turn its packed weight back into a
dense one (torchao's Int4TilePackedTo4dTensor has no dequantize). These kernels do, in one pass,
one 8 x 128 tile (128 packed int32 words) per program, one warp each:

- `_dequant_published_kernel`, used when the packer writes the layout its source defines
  (bench.quant.int4.tinygemm_tile_source; KernelLayout checks it against a probe): it reads the
  tile's words in order, takes each word's 8 nibbles, scales them and lets Triton move them to
  row-major order through registers (a permute), so loads and stores are both contiguous;
- `_dequant_gather_kernel`, for any tile permutation learnt from the packer: each element finds
  its nibble through the learnt table (a gather per element; slower).

On the H200 one tile and one warp per program was among the fastest of 1-8 tiles x 1-8 warps in
a scratch sweep; `dequantize_only` (published) and `dequantize_gather` in
f67f436:results/h200/int4_kernels_*.csv are the kept numbers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TINYGEMM_MID = 8


@triton.jit
def _dequant_published_kernel(p_ptr, sz_ptr, w_ptr, N, K, G: tl.constexpr, MID: tl.constexpr):
    t = tl.program_id(0)
    kt_count = K // 128
    # The tile's words as [row n (8), lane pair l (4), word w (4)]: word (n, l, w) holds
    # columns 32 w + 2 l + 8 i + lo of row n in its nibble i + 4 lo (int4.tinygemm_tile_source).
    nn = tl.arange(0, 8)[:, None, None]
    ll = tl.arange(0, 4)[None, :, None]
    ww = tl.arange(0, 4)[None, None, :]
    word = tl.load(p_ptr + t * 128 + nn * 16 + ll * 4 + ww)
    n = (t // kt_count) * 8 + nn
    kb = (t % kt_count) * 128 + 32 * ww + 2 * ll  # a word's 8 columns lie in one 32-column group
    so = ((kb // G) * N + n) * 2  # scale_and_zero is [K/G, N, 2]
    s = tl.load(sz_ptr + so).to(tl.float32)[:, :, :, None, None]
    z = tl.load(sz_ptr + so + 1).to(tl.float32)[:, :, :, None, None]
    j = tl.arange(0, 2)[:, None] * 4 + tl.arange(0, 4)[None, :]  # nibble index as [lo, i]
    q = (word[:, :, :, None, None] >> (4 * j)[None, None, None, :, :]) & 15
    v = ((q.to(tl.float32) - MID) * s + z).to(w_ptr.dtype.element_ty)  # [n, l, w, lo, i]
    v = tl.reshape(tl.permute(v, (0, 2, 4, 1, 3)), (8, 128))  # [n, w, i, l, lo]: row-major columns
    rows = (t // kt_count) * 8 + tl.arange(0, 8)[:, None]
    cols = (t % kt_count) * 128 + tl.arange(0, 128)[None, :]
    tl.store(w_ptr + rows * K + cols, v)


@triton.jit
def _dequant_gather_kernel(p_ptr, sz_ptr, inv_ptr, w_ptr, N, K, G: tl.constexpr, MID: tl.constexpr):
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


def _kernel_and_args(packed, scale_and_zero, tile_inverse, out, published: bool) -> tuple:
    """The dequantizer for this layout and its positional arguments (both callers launch it)."""
    n, k = out.shape
    if published:
        return _dequant_published_kernel, (packed, scale_and_zero, out, n, k)
    return _dequant_gather_kernel, (packed, scale_and_zero, tile_inverse, out, n, k)


def _grid(out: torch.Tensor) -> tuple[int]:
    return ((out.shape[0] // 8) * (out.shape[1] // 128),)  # one program per 8 x 128 tile


def dequantize_tinygemm(packed: torch.Tensor, scale_and_zero: torch.Tensor, tile_inverse: torch.Tensor,
                        out: torch.Tensor, group: int, published: bool) -> torch.Tensor:
    """Write the dense weight into `out` ([N, K], the activation dtype). `published`: the packed
    layout is the one the source defines (else `tile_inverse`, the learnt one, is read)."""
    kernel, args = _kernel_and_args(packed, scale_and_zero, tile_inverse, out, published)
    kernel[_grid(out)](*args, G=group, MID=TINYGEMM_MID, num_warps=1)
    return out


def dequantize_traceable(packed: torch.Tensor, scale_and_zero: torch.Tensor, tile_inverse: torch.Tensor, n: int,
                         k: int, group: int, dtype: torch.dtype, published: bool) -> torch.Tensor:
    """The dense [n, k] weight in a new tensor, written so torch.compile traces it: inductor then
    launches the kernel from its generated code (a few microseconds of host time) instead of
    calling back into Python per linear (the opaque custom op + graph replay of bench.quant.int4
    cost ~45 us of host time each; a host-bound prefill makes 128 of them for vila1.5-3b).
    The launch is dequantize_tinygemm's with `wrap_triton` around the kernel, written out here:
    dynamo traces that call, not a wrapper passed in."""
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    kernel, args = _kernel_and_args(packed, scale_and_zero, tile_inverse, out, published)
    torch.library.wrap_triton(kernel)[_grid(out)](*args, G=group, MID=TINYGEMM_MID, num_warps=1)
    return out

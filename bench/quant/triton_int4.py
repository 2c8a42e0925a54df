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
results/h200/int4_kernels_*.csv are the kept numbers.

`matmul_int4` is the other way to run a prefill over these weights (`--int4-fused-prefill`): a
w4a16 GEMM that dequantizes each k-tile of the weight in registers and feeds it to the tensor
cores, so the dense weight is never written to memory nor read back. Written here: PyTorch has
no int4 GEMM for many rows (tinygemm is a GEMV-style kernel) and torchao's int4 tensors run
tinygemm; the Marlin-style kernels that do this live in vLLM/gptqmodel builds that are not
installable here and use their own packings.
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


@triton.jit
def _w4a16_published_kernel(x_ptr, p_ptr, sz_ptr, o_ptr, M, N, K, sxm, som, G: tl.constexpr, MID: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, GATHER_X: tl.constexpr):
    # Programs that share an n-block (its weights) run one after another: pid -> (m fastest, n),
    # so a weight tile comes from HBM once and from L2 for the other m-blocks.
    pid = tl.program_id(0)
    m_blocks = tl.cdiv(M, BM)
    pid_m, pid_n = pid % m_blocks, pid // m_blocks
    kt_count = K // 128
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    # Words of a k-tile for these rows as [row (BN), lane pair l (4), word w (4)] (the layout of
    # _dequant_published_kernel, one 8 x 128 tile = 128 contiguous words per 8 rows).
    ll = tl.arange(0, 4)[None, :, None]
    ww = tl.arange(0, 4)[None, None, :]
    words_at = p_ptr + ((rn // 8) * (kt_count * 128) + (rn % 8) * 16)[:, None, None] + ll * 4 + ww
    j = tl.arange(0, 2)[:, None] * 4 + tl.arange(0, 4)[None, :]  # nibble index as [lo, i]
    if GATHER_X:  # x's columns in the words' order [l, w, lo, i] (column 32 w + 8 i + 2 l + lo)
        lo_i = tl.arange(0, 2)[:, None] + 8 * tl.arange(0, 4)[None, :]
        l_w = tl.reshape(32 * ww + 2 * ll, (4, 4))
        cols = tl.reshape(l_w[:, :, None, None] + lo_i[None, None, :, :], (128,))
    else:
        cols = tl.arange(0, 128)
    m_ok = rm[:, None] < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(0, kt_count):
        word = tl.load(words_at + kt * 128)
        # A word's 8 columns lie in its 32-column group (G is a multiple of 32): one scale per (row, w).
        so = (((kt * 128 + 32 * ww) // G) * N + rn[:, None, None]) * 2  # scale_and_zero is [K/G, N, 2]
        s = tl.load(sz_ptr + so).to(tl.float32)[:, :, :, None, None]
        z = tl.load(sz_ptr + so + 1).to(tl.float32)[:, :, :, None, None]
        q = (word[:, :, :, None, None] >> (4 * j)[None, None, None, :, :]) & 15
        w = ((q.to(tl.float32) - MID) * s + z).to(x_ptr.dtype.element_ty)  # [n, l, w, lo, i]: as the dense path
        if GATHER_X:  # the weight stays in register order; x is loaded to match it
            w = tl.reshape(w, (BN, 128))
        else:
            w = tl.reshape(tl.permute(w, (0, 2, 4, 1, 3)), (BN, 128))  # [n, w, i, l, lo]: row-major columns
        x = tl.load(x_ptr + rm[:, None] * sxm + kt * 128 + cols[None, :], mask=m_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(o_ptr + rm[:, None] * som + rn[None, :], acc.to(o_ptr.dtype.element_ty), mask=m_ok)


# Tile sizes of the w4a16 GEMM: (rows, output features) per program, warps, pipeline stages;
# gather_x: load x's columns in the packed order instead of permuting the dequantized weight.
W4A16_CONFIG = {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3, "gather_x": False}


def fused_block_n(n: int, most: int | None = None) -> int | None:
    """Output features per program of the w4a16 GEMM for an `n`-feature weight: the largest of
    128..16 (powers of two, at most `most`) that divides n; None: none does, it cannot run fused."""
    most = most or W4A16_CONFIG["BN"]
    return next((bn for bn in (128, 64, 32, 16) if bn <= most and n % bn == 0), None)


def matmul_int4(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, n: int, group: int,
                traceable: bool = False, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ W^T for W held in the published tinygemm layout (`packed`, `scale_and_zero`
    [K/G, N, 2]): [M, n] in x's dtype, accumulated in fp32, each weight element rounded to x's
    dtype first (as the dense path's dequantized weight is). `traceable`: launched through
    torch.library.wrap_triton, so torch.compile traces it into its own graph (see
    dequantize_traceable). `config`: tile sizes (default W4A16_CONFIG)."""
    cfg = {**W4A16_CONFIG, **(config or {})}
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    bn = fused_block_n(n, cfg["BN"])
    if bn is None or k % 128 or group % 32:
        raise ValueError(f"the w4a16 GEMM needs out_features % 16 == 0, in_features % 128 == 0 and a group "
                         f"size multiple of 32; got {n}x{k}, group {group}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernel = torch.library.wrap_triton(_w4a16_published_kernel) if traceable else _w4a16_published_kernel
    grid = (triton.cdiv(m, cfg["BM"]) * (n // bn),)
    kernel[grid](x, packed, scale_and_zero, out, m, n, k, x.stride(0), out.stride(0), G=group, MID=TINYGEMM_MID,
                 BM=cfg["BM"], BN=bn, GATHER_X=cfg["gather_x"], num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"])
    return out


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

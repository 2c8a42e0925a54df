"""A Triton W4A16 matmul over the int4 layer's own packed weight (tinygemm's published tile layout).

y = x @ W^T for few rows, reading the weight where the layer keeps it: no second packed copy (the
gemlite and FBGEMM kernels each hold one) and no dense one. Every 8 x 128 tile of W is 128
consecutive int32 words (bench.quant.int4.tinygemm_tile_source: word (row n, lane pair l, word w)
holds columns 32 w + 2 l + 8 i + lo of row n in nibble i + 4 lo), and a row's tiles follow one
another along K, so a program's weight rows are one contiguous stream.

Instead of moving the nibbles into column order, each program takes x in the nibbles' order (x is
a few rows, read from L1/L2): per k-tile, q[n, lw, j] (lw = 4 l + w, j = i + 4 lo) meets
x[m, 32 w + 2 l + 8 i + lo] (the elementwise path reads x as it lies and permutes it in
registers, the tl.dot path gathers it). A word's 8 columns lie in one 32-column run, so one (scale, zero)
pair per (row, word) covers them (groups are 32 or more), and with groups of 128 or more one per
(row, k-tile). The weight is dequantized as the dense
path does, (q - 8) * scale + zero in fp32; up to 4 rows multiply and reduce elementwise, more rows
(padded to 16) run tl.dot on the weight in the activation dtype.

`tiles_mm` launches one program per TN x 8 weight rows (and per 16 or fewer x rows); with
`split_k` also one per share of K, the shares added into an fp32 output by atomics. Block sizes,
warps and stages autotune per (N, K, rows block, split or not) on the first call (Triton's
autotuner: host-synchronized benchmarks, so never inside a CUDA graph capture; the kernel class
asks to be called once per row count before any capture, bench.quant.w4a16.tiles). Hand-written
because no maintained library multiplies by this layout: tinygemm's own kernel is the one that
does, and it is what this is measured against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench.quant.int4 import TINYGEMM_MID
from bench.quant.w4a16.base import autotune_bench

DOT_ROWS = 16  # x rows a tl.dot program takes (its M block); up to ELEMENTWISE_ROWS reduce elementwise
ELEMENTWISE_ROWS = 4


def _configs(split: bool) -> list:
    """The candidates (pruned per call by _prune): every (shape, rows block) key benchmarks those
    left, and each compiles once per rows block, so kept few (a 7B's four shapes tune in seconds)."""
    if split:
        space = [(tn, bkt, sk) for tn in (1, 2) for bkt in (2, 4) for sk in (2, 4, 8)]
    else:
        space = [(tn, bkt, 1) for tn in (1, 2, 4) for bkt in (1, 2, 4, 8, 16)]
    return [triton.Config({"TN": tn, "BKT": bkt, "SPLIT_K": sk}, num_warps=4, num_stages=3) for tn, bkt, sk in space]


MAX_ACC = 8192  # elementwise: products held per program (x rows x weight rows x columns), registers
# ... twice that at one row: 16 k-tiles of one 8-row block (or 8 of two) issue the fewest instructions
# per weight on sm_90 (5.98 and 6.01 against 6.84 for 8 k-tiles) in 245 and 211 registers without
# spilling (lab/triton_tiles_aot.py); whether that beats the occupancy it costs, measuring says
MAX_ACC_ONE_ROW = 2 * MAX_ACC
MAX_TILE = 8192  # tl.dot: weight values dequantized per step


def _prune(configs, named_args, **kwargs):
    """tl.dot needs 16 weight rows or more (TN >= 2); what a program holds stays within MAX_ACC
    or MAX_TILE values (registers); a share of K is at least one block of tiles."""
    k_tiles = named_args["K"] // 128
    rows_block = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))

    def fits(c) -> bool:
        values = c.kwargs["TN"] * 8 * c.kwargs["BKT"] * 128
        if rows_block <= ELEMENTWISE_ROWS:
            return rows_block * values <= (MAX_ACC_ONE_ROW if rows_block == 1 else MAX_ACC)
        return c.kwargs["TN"] >= 2 and values <= MAX_TILE

    kept = [c for c in configs if fits(c) and c.kwargs["SPLIT_K"] * c.kwargs["BKT"] <= max(k_tiles, 1)]
    return kept or [min(configs, key=lambda c: (c.kwargs["TN"] < 2, c.kwargs["TN"] * c.kwargs["BKT"]))]


@triton.jit
def _weights(p_ptr, sz_ptr, n, n_ok, kt, k_ok, k_tiles, N, G: tl.constexpr, MID: tl.constexpr):
    """Rows n's k-tiles kt dequantized, fp32 [BN, BKT, 16, 8] in the nibbles' order: [row, tile,
    word lw = 4 l + w, nibble j = i + 4 lo].

    Each nibble becomes a float without an int -> float conversion (a quarter-rate instruction on
    the SMs) and without being shifted down: nibble i of a word's 16-bit half, masked in place and
    set into the mantissa of 2^23, is the float 2^23 + q 16^i, and 2^23 off it leaves q 16^i
    exactly; its scale takes the 16^-i (exact, a power of two) and the zero point takes -MID s,
    so w = (q 16^i)(s 16^-i) + (z - MID s) = (q - MID) s + z rounded once, as dequantizing does
    (z - MID s is exact in fp32 for the zero points the quantizer writes, (MID - zero) s).
    A half word costs one shift and each nibble one bit operation (mask and set fused) and three
    float ones: at few rows the kernel is bound by the instructions it issues per weight."""
    lw = tl.arange(0, 16)
    i = tl.arange(0, 4)
    w_ok = n_ok[:, None, None] & k_ok[None, :, None]
    words = tl.load(p_ptr + ((n // 8)[:, None, None] * k_tiles + kt[None, :, None]) * 128
                    + (n % 8)[:, None, None] * 16 + lw[None, None, :], mask=w_ok, other=0)  # [BN, BKT, 16]
    if G >= 128:  # one (scale, zero) per row and k-tile
        so = ((kt * 128 // G)[None, :] * N + n[:, None]) * 2  # [BN, BKT]
        tile_ok = n_ok[:, None] & k_ok[None, :]
        s = tl.load(sz_ptr + so, mask=tile_ok, other=0.0).to(tl.float32)[:, :, None, None]
        z = tl.load(sz_ptr + so + 1, mask=tile_ok, other=0.0).to(tl.float32)[:, :, None, None]
    else:  # one per row and word (a word's 8 columns lie in the 32-column run 32 w ..)
        g = (kt[:, None] * 128 + (32 * (lw % 4))[None, :]) // G  # [BKT, 16]
        so = (g[None, :, :] * N + n[:, None, None]) * 2
        s = tl.load(sz_ptr + so, mask=w_ok, other=0.0).to(tl.float32)[:, :, :, None]
        z = tl.load(sz_ptr + so + 1, mask=w_ok, other=0.0).to(tl.float32)[:, :, :, None]
    half = tl.arange(0, 2)
    mask = (15 << (4 * i))[None, None, None, None, :]  # nibble i of a 16-bit half, in place
    unit = ((127 - 4 * i) << 23).to(tl.float32, bitcast=True)[None, None, None, None, :]  # 16^-i
    s_i = s[:, :, :, :, None] * unit
    z_mid = (z - MID * s)[:, :, :, :, None]
    halves = words[:, :, :, None] >> (16 * half)[None, None, None, :]  # [BN, BKT, 16, 2]
    f = ((halves[:, :, :, :, None] & mask) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    w = f * s_i + z_mid  # [BN, BKT, 16, 2, 4]: nibble i + 4 lo at [.., lo, i]
    return tl.reshape(w, (w.shape[0], w.shape[1], 16, 8))


@triton.jit
def _activations(x_ptr, m, m_ok, kt, k_ok, stride_xm):
    """x rows m at the columns of _weights' nibbles, [BLOCK_M, BKT, 16, 8] in x's dtype: nibble
    (lw = 4 l + w, c = i + 4 lo) of a tile holds column 32 w + 2 l + 8 i + lo."""
    lw = tl.arange(0, 16)
    c = tl.arange(0, 8)
    col = (32 * (lw % 4) + 2 * (lw // 4))[:, None] + (8 * (c % 4) + c // 4)[None, :]  # [16, 8]
    xo = (kt * 128)[:, None, None] + col[None, :, :]  # [BKT, 16, 8]
    return tl.load(x_ptr + m[:, None, None, None] * stride_xm + xo[None, :, :, :],
                   mask=m_ok[:, None, None, None] & k_ok[None, :, None, None], other=0.0)


@triton.jit
def _activations_in_order(x_ptr, m, m_ok, kt, k_ok, stride_xm):
    """The same values as _activations, read as x lies (each k-tile's 128 columns in one piece,
    vectorized) and put into the nibbles' order in registers: column 32 w + 8 i + 2 l + lo is
    [w, i, l, lo] of the tile, wanted at [l, w, lo, i]. For the elementwise path: its K loop
    issues fewer instructions per weight than with _activations' gather (sm_90 SASS, at one row
    8.25 -> 6.84 for the best configuration: lab/triton_tiles_aot.py); the tl.dot path more."""
    BKT: tl.constexpr = kt.shape[0]
    BM: tl.constexpr = m.shape[0]
    col = tl.arange(0, 128)
    x = tl.load(x_ptr + m[:, None, None] * stride_xm + (kt * 128)[None, :, None] + col[None, None, :],
                mask=m_ok[:, None, None] & k_ok[None, :, None], other=0.0)  # [BLOCK_M, BKT, 128]
    x = tl.permute(tl.reshape(x, (BM, BKT, 4, 4, 4, 2)), (0, 1, 4, 2, 5, 3))  # [m, kt, l, w, lo, i]
    return tl.reshape(x, (BM, BKT, 16, 8))


@triton.jit
def _tiles_mm_kernel(x_ptr, p_ptr, sz_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                     G: tl.constexpr, BLOCK_M: tl.constexpr, TN: tl.constexpr, BKT: tl.constexpr,
                     SPLIT_K: tl.constexpr, MID: tl.constexpr):
    BN: tl.constexpr = TN * 8
    BK: tl.constexpr = BKT * 128
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_tiles = K // 128
    n = pid_n * BN + tl.arange(0, BN)  # weight rows
    n_ok = n < N
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # x rows
    m_ok = m < M
    per = tl.cdiv(k_tiles, SPLIT_K)  # k-tiles of a share
    kt_lo = pid_k * per
    if BLOCK_M <= 4:
        # products summed elementwise along the loop, reduced across the program's threads once
        prods = tl.zeros((BLOCK_M, BN, BK), dtype=tl.float32)
        for step in range(0, tl.cdiv(per, BKT)):
            kt = kt_lo + step * BKT + tl.arange(0, BKT)
            k_ok = (kt < kt_lo + per) & (kt < k_tiles)
            w = tl.reshape(_weights(p_ptr, sz_ptr, n, n_ok, kt, k_ok, k_tiles, N, G, MID), (1, BN, BK))
            x = tl.reshape(_activations_in_order(x_ptr, m, m_ok, kt, k_ok, stride_xm).to(tl.float32), (BLOCK_M, 1, BK))
            prods += w * x
        acc = tl.sum(prods, axis=2)
    else:
        acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
        for step in range(0, tl.cdiv(per, BKT)):
            kt = kt_lo + step * BKT + tl.arange(0, BKT)
            k_ok = (kt < kt_lo + per) & (kt < k_tiles)
            w = _weights(p_ptr, sz_ptr, n, n_ok, kt, k_ok, k_tiles, N, G, MID).to(x_ptr.dtype.element_ty)
            x = _activations(x_ptr, m, m_ok, kt, k_ok, stride_xm)
            acc = tl.dot(tl.reshape(x, (BLOCK_M, BK)), tl.trans(tl.reshape(w, (BN, BK))), acc)
    y = y_ptr + m[:, None] * stride_ym + n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(y, acc, mask=ok, sem="relaxed")


_tuned = triton.autotune(_configs(split=False), key=["N", "K", "BLOCK_M"], do_bench=autotune_bench,
                         prune_configs_by={"early_config_prune": _prune})(_tiles_mm_kernel)
_tuned_split = triton.autotune(_configs(split=True), key=["N", "K", "BLOCK_M"], reset_to_zero=["y_ptr"],
                               do_bench=autotune_bench,
                               prune_configs_by={"early_config_prune": _prune})(_tiles_mm_kernel)


def rows_block(rows: int) -> int:
    """The x rows one program takes for a call of `rows` rows."""
    if rows <= ELEMENTWISE_ROWS:
        return 1 if rows == 1 else (2 if rows == 2 else 4)
    return DOT_ROWS


def tiles_mm(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
             group_size: int, split_k: bool, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (float16 or bfloat16, or float32 with `config` in Triton's interpreter) times the
    packed int4 weight [N = out_features, K]^T -> [M, N] in x's dtype. `config` (TN, BKT, SPLIT_K,
    num_warps, num_stages) skips autotuning (tests; the interpreter cannot benchmark)."""
    x = x.contiguous()
    rows, k = x.shape
    n = out_features
    block = rows_block(rows)
    y = torch.zeros(rows, n, dtype=torch.float32, device=x.device) if split_k else \
        torch.empty(rows, n, dtype=x.dtype, device=x.device)
    args = (x, packed, scale_and_zero, y, rows, n, k, x.stride(0), y.stride(0))
    if config is not None:
        config = dict(config)
        launch = {"num_warps": config.pop("num_warps", 4), "num_stages": config.pop("num_stages", 3)}
        grid = (triton.cdiv(n, 8 * config["TN"]), triton.cdiv(rows, block), config["SPLIT_K"])
        _tiles_mm_kernel[grid](*args, G=group_size, BLOCK_M=block, MID=TINYGEMM_MID, **config, **launch)
    else:
        def grid(meta):
            return triton.cdiv(n, 8 * meta["TN"]), triton.cdiv(rows, block), meta["SPLIT_K"]

        (_tuned_split if split_k else _tuned)[grid](*args, G=group_size, BLOCK_M=block, MID=TINYGEMM_MID)
    return y.to(x.dtype) if split_k else y


def tuning_count() -> int:
    """Keys the autotuners have tuned so far (compile_events counts a tuning inside a measured run)."""
    return len(_tuned.cache) + len(_tuned_split.cache)

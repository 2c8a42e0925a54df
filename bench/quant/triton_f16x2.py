"""A one-row Triton W4A16 GEMV over the int4 layer's own packed weight (tinygemm's tile layout, as
bench.quant.triton_w4a16 reads it) that dequantizes and multiplies two weights per instruction.

At one row a W4A16 kernel is bound by the instructions it issues per weight: int4 weights read at
2.5-2.8 TB/s are 5-6e12 weights a second, and an H100 issues about 6 thread-instructions per weight
at that rate (132 SMs x 128 a cycle), an H200 about 4. triton-tiles dequantizes and multiplies in
fp32, one weight per instruction: about 6 per weight in its K loop at its best configuration
(lab/triton_tiles_aot.py). Here each int32 word of the tile layout (its 8 nibbles: the column pairs
c, c + 1 for four c) becomes four f16x2 values with one LOP3 each and one shift (Marlin's
dequantization): nibbles 0 and 2 as 1024 + q, which `sub.f16x2` takes 1032 off, nibbles 1 and 3
as 1024 + 16 q, which `fma.rn.f16x2` by 1/16 and -72 takes to q - 8 (both exact in fp16); an
`fma.rn.f16x2` with the group's scale and zero rounds once to the fp16 weight the dense path makes
((q - 8) s + z), and four f16x2 multiply-adds with x's column pairs leave two fp16 partial sums of
four products each, added into fp32: 21 instructions per 8 weights, 3.2-4.4 per weight with the
loop's loads and addresses in the configurations kept below with the unpipelined K loop (sm_90
SASS, lab/triton_tiles_h2.py aot; fewer where a thread holds more weights, more in the pipelined
loop, K_LOOPS). The fastest configuration of a shape is not always
the one issuing fewest: more, smaller programs also hide more of the memory's latency. The f16x2
block is inline PTX: Triton has no type for two halves in one register.

A program's words are laid out rows first, [row, k-tile, word] (a thread's consecutive elements
are consecutive words of one row, loaded at once), or rows last, [k-tile, word, row] (they are
rows of one word position and share x's values, loaded once for them): on an H100 rows first was
the faster at 7 of llava-1.5-7b's and vila1.5-3b's 8 weight shapes, by up to 1.3x, rows last at
llava's gate/up projection, by 1.08x (lab/triton_tiles_h2.py gpu). One program per TN x 8 weight
rows, and with split K one per share of K, the shares' fp32 sums added in order by the program
of the row block that finishes last (`split_k`: split K only; without it the tuning also tries
the splits SPLITS names). The layout, block sizes, warps, splits and K loop are tuned per (N, K)
on the first call (_tune: timed in CUDA graphs, host-synchronized, so never inside a capture; the
kernel class asks to be called once before any capture, bench.quant.w4a16.f16x2). float16 activations, groups of 128 or
more. Hand-written because no maintained library multiplies by this layout.

In Triton's interpreter (no PTX there) EMULATE runs the same index math with the f16x2 block done
in fp32 Triton operations: the tests check the layout with it, and the PTX on a GPU.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.errors import OutOfResources, PTXASError

from bench import pdl as pdl_settings
from bench.pdl import enabled as pdl_enabled, prefetch_l2
from bench.quant.int4 import TINYGEMM_MID

MID = tl.constexpr(TINYGEMM_MID)

# $0: fp32 sum of the word's 8 products; $1: the word; $2..$5: x's column pairs of nibbles 0..3
# (low half: column c, high half: c + 1); $6: the group's (scale, zero) as f16x2
F16X2 = tl.constexpr("""{
.reg .b32 t0, t1, t2, t3, u, s2, z2, c, k, m, p;
.reg .b16 sh, zh, plo, phi;
.reg .f32 flo, fhi;
mov.b32 {sh, zh}, $6;
mov.b32 s2, {sh, sh};
mov.b32 z2, {zh, zh};
mov.b32 c, 0x64086408;
mov.b32 k, 0x2c002c00;
mov.b32 m, 0xd480d480;
lop3.b32 t0, $1, 0x000f000f, 0x64006400, 0xea;
lop3.b32 t1, $1, 0x00f000f0, 0x64006400, 0xea;
shr.u32 u, $1, 8;
lop3.b32 t2, u, 0x000f000f, 0x64006400, 0xea;
lop3.b32 t3, u, 0x00f000f0, 0x64006400, 0xea;
sub.f16x2 t0, t0, c;
fma.rn.f16x2 t1, t1, k, m;
sub.f16x2 t2, t2, c;
fma.rn.f16x2 t3, t3, k, m;
fma.rn.f16x2 t0, t0, s2, z2;
fma.rn.f16x2 t1, t1, s2, z2;
fma.rn.f16x2 t2, t2, s2, z2;
fma.rn.f16x2 t3, t3, s2, z2;
mul.rn.f16x2 p, t0, $2;
fma.rn.f16x2 p, t1, $3, p;
fma.rn.f16x2 p, t2, $4, p;
fma.rn.f16x2 p, t3, $5, p;
mov.b32 {plo, phi}, p;
cvt.f32.f16 flo, plo;
cvt.f32.f16 fhi, phi;
add.f32 flo, flo, fhi;
mov.b32 $0, flo;
}""")


@triton.jit
def _half(v, high: tl.constexpr):
    """The fp16 in the low or high 16 bits of int32 `v`, as fp32."""
    if high:
        bits = (v >> 16) & 0xFFFF
    else:
        bits = v & 0xFFFF
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _words_emulated(words, x0, x1, x2, x3, sz):
    """What F16X2 computes per word, in fp32 Triton operations (for the interpreter)."""
    s = _half(sz, False)
    z = _half(sz, True)
    out = tl.zeros(words.shape, dtype=tl.float32)
    for i in tl.static_range(4):
        if i == 0:
            xi = x0
        elif i == 1:
            xi = x1
        elif i == 2:
            xi = x2
        else:
            xi = x3
        v = words >> (4 * i)
        lo = ((v & 0xF).to(tl.float32) - MID) * s + z
        hi = (((v >> 16) & 0xF).to(tl.float32) - MID) * s + z
        out += lo * _half(xi, False) + hi * _half(xi, True)
    return out


@triton.jit
def _products(words, x0, x1, x2, x3, sz, EMULATE: tl.constexpr):
    """Each word's 8 products summed in fp32, by the PTX block (or its stand-in)."""
    if EMULATE:
        return _words_emulated(words, x0, x1, x2, x3, sz)
    return tl.inline_asm_elementwise(F16X2, "=r,r,r,r,r,r,r", [words, x0, x1, x2, x3, sz],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _words(p_ptr, k_tiles, kt, k_ok, n, n_ok, lw, ROWS_FIRST: tl.constexpr):
    """The words of k-tiles `kt` for rows `n`: [row, k-tile, word] rows first (a thread's elements
    are consecutive words of one row, loaded at once), [k-tile, word, row] rows last (they are rows
    of one word position, sharing x's values, loaded once for them)."""
    if ROWS_FIRST:
        words = tl.load(p_ptr + ((n // 8)[:, None, None] * k_tiles + kt[None, :, None]) * 128
                        + (n % 8)[:, None, None] * 16 + lw[None, None, :],
                        mask=n_ok[:, None, None] & k_ok[None, :, None], other=0)
    else:
        words = tl.load(p_ptr + ((n // 8)[None, None, :] * k_tiles + kt[:, None, None]) * 128
                        + (n % 8)[None, None, :] * 16 + lw[None, :, None],
                        mask=n_ok[None, None, :] & k_ok[:, None, None], other=0)
    return words


@triton.jit
def _scales(sz32, N, kt, k_ok, n, n_ok, G: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """The scale/zero pairs of k-tiles `kt`'s groups for rows `n`: [row, k-tile] or [k-tile, row]."""
    if ROWS_FIRST:
        sz = tl.load(sz32 + (kt * 128 // G)[None, :] * N + n[:, None], mask=n_ok[:, None] & k_ok[None, :], other=0)
    else:
        sz = tl.load(sz32 + (kt * 128 // G)[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
    return sz


@triton.jit
def _x(x32, xo, k_ok, BN: tl.constexpr, BKT: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """x's column pairs at offsets `xo` [k-tile, word], broadcast over the rows."""
    return _bx(tl.load(x32 + xo, mask=k_ok[:, None], other=0), BN, BKT, ROWS_FIRST)


@triton.jit
def _xs(x32, kt, k_ok, pair, BN: tl.constexpr, BKT: tl.constexpr, ROWS_FIRST: tl.constexpr, XW: tl.constexpr):
    """x's column pairs for nibbles 0 to 3 of k-tiles `kt`'s words: each gathered where the words
    want it (_x), or (XW) whole k-tiles loaded contiguously and put in order in registers (_xs_whole)."""
    if XW:
        return _xs_whole(x32, kt, k_ok, BN, BKT, ROWS_FIRST)
    xo = (kt * 64)[:, None] + pair[None, :]
    return (_x(x32, xo, k_ok, BN, BKT, ROWS_FIRST), _x(x32, xo + 4, k_ok, BN, BKT, ROWS_FIRST),
            _x(x32, xo + 8, k_ok, BN, BKT, ROWS_FIRST), _x(x32, xo + 12, k_ok, BN, BKT, ROWS_FIRST))


@triton.jit
def _xs_whole(x32, kt, k_ok, BN: tl.constexpr, BKT: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """_xs by whole k-tiles: each k-tile's 64 column pairs loaded contiguously ([b, i, a], pair
    16 b + 4 i + a of word 4 a + b's nibble i), then put in the words' order in registers."""
    xo = (kt * 64)[:, None] + tl.arange(0, 64)[None, :]
    v = tl.load(x32 + xo, mask=k_ok[:, None], other=0)
    v = tl.permute(tl.reshape(v, (BKT, 4, 4, 4)), (0, 3, 1, 2))  # [kt, a, b, i]: word 4 a + b's nibble i
    v = tl.reshape(v, (BKT, 16, 2, 2))  # [kt, word, i // 2, i % 2]
    even, odd = tl.split(v)
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return (_bx(x0, BN, BKT, ROWS_FIRST), _bx(x1, BN, BKT, ROWS_FIRST), _bx(x2, BN, BKT, ROWS_FIRST),
            _bx(x3, BN, BKT, ROWS_FIRST))


@triton.jit
def _bx(v, BN: tl.constexpr, BKT: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """x's column pairs `v` [k-tile, word] broadcast over the rows, in the program's layout."""
    if ROWS_FIRST:
        v = tl.broadcast_to(v[None, :, :], (BN, BKT, 16))
    else:
        v = tl.broadcast_to(v[:, :, None], (BKT, 16, BN))
    return v


@triton.jit
def _accumulate(acc, words, x0, x1, x2, x3, sz, BN: tl.constexpr, BKT: tl.constexpr, ROWS_FIRST: tl.constexpr,
                EMULATE: tl.constexpr):
    """acc plus the products of a block's words with x's column pairs (sz broadcast over the words)."""
    if ROWS_FIRST:
        sz = tl.broadcast_to(sz[:, :, None], (BN, BKT, 16))
    else:
        sz = tl.broadcast_to(sz[:, None, :], (BKT, 16, BN))
    return acc + _products(words, x0, x1, x2, x3, sz, EMULATE)


@triton.jit
def _k_loop(x32, p_ptr, sz32, N, k_tiles, kt_lo, per, n, n_ok, lw, pair, words0, sz0, G: tl.constexpr,
            BN: tl.constexpr, BKT: tl.constexpr, ROWS_FIRST: tl.constexpr, PRELOADED: tl.constexpr,
            KS: tl.constexpr, XW: tl.constexpr, EMULATE: tl.constexpr):
    """The K loop over the program's share of k-tiles; returns each row's sum. PRELOADED: the
    first block's words and scales are `words0`, `sz0` (loaded before the kernel's PDL wait). KS:
    the loop's stages (1: not pipelined; K_LOOPS). XW: x read by whole k-tiles (_xs)."""
    if ROWS_FIRST:
        acc = tl.zeros((BN, BKT, 16), dtype=tl.float32)
    else:
        acc = tl.zeros((BKT, 16, BN), dtype=tl.float32)
    first = 0
    if PRELOADED:
        kt = kt_lo + tl.arange(0, BKT)
        k_ok = (kt < kt_lo + per) & (kt < k_tiles)
        x0, x1, x2, x3 = _xs(x32, kt, k_ok, pair, BN, BKT, ROWS_FIRST, XW)
        acc = _accumulate(acc, words0, x0, x1, x2, x3, sz0, BN, BKT, ROWS_FIRST, EMULATE)
        first = 1
    for step in tl.range(first, tl.cdiv(per, BKT), num_stages=KS):
        kt = kt_lo + step * BKT + tl.arange(0, BKT)
        k_ok = (kt < kt_lo + per) & (kt < k_tiles)
        words = _words(p_ptr, k_tiles, kt, k_ok, n, n_ok, lw, ROWS_FIRST)
        x0, x1, x2, x3 = _xs(x32, kt, k_ok, pair, BN, BKT, ROWS_FIRST, XW)
        sz = _scales(sz32, N, kt, k_ok, n, n_ok, G, ROWS_FIRST)
        acc = _accumulate(acc, words, x0, x1, x2, x3, sz, BN, BKT, ROWS_FIRST, EMULATE)
    if ROWS_FIRST:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        y = tl.sum(tl.sum(acc, axis=1), axis=0)
    return y


@triton.jit
def _f16x2_kernel(x32, p_ptr, sz32, y_ptr, ws_ptr, count_ptr, N, K, G: tl.constexpr, TN: tl.constexpr,
                  BKT: tl.constexpr, SPLIT_K: tl.constexpr, ROWS_FIRST: tl.constexpr, EMULATE: tl.constexpr,
                  PDL: tl.constexpr = False,
                  PREFETCH: tl.constexpr = 4, PRELOAD: tl.constexpr = False, KS: tl.constexpr = 1,
                  XW: tl.constexpr = False, LATE: tl.constexpr = False,
                  res_ptr=None, g_ptr=None, xn_ptr=None, ss_ptr=None, grid_count_ptr=None, eps=0.0,
                  NORM: tl.constexpr = False, PB: tl.constexpr = 1, NB: tl.constexpr = 8192,
                  AHEAD: tl.constexpr = True, GATE: tl.constexpr = False):
    """y[n] = sum_k x[k] W[n, k] for one row of x, given as int32 column pairs (x32 [K / 2]),
    the scales and zeros as int32 pairs (sz32 [K / G, N]); the program's words laid out rows
    first or rows last (ROWS_FIRST). Split K (SPLIT_K > 1): each share's sums go to ws_ptr
    (fp32 [SPLIT_K, N]) and the program of a row block that counts last in count_ptr (int32 per
    row block, zeros; it sets its count back to zero) adds the shares in order and writes y.
    PDL: launched with programmatic dependent launch (bench.pdl): wait for the kernel before
    (asking L2 first for the first PREFETCH quarters of the program's weights, bench.pdl.PREFETCH),
    then let the next one start (LATE, bench.pdl.LATE: after the K loop instead). PRELOAD: the
    first block of the program's weights and scales is loaded (into registers) before that wait
    (bench.pdl.PRELOAD). KS, XW: the K loop (K_LOOPS). NORM: y is added to the residual stream
    and the sum is normalized (_add_norm; y_ptr gets the sum). GATE: the weight is a gate
    projection's N / 2 rows over an up projection's (a fused gate/up), each program's rows half
    gate rows and the same rows of the up half (TN even), and y_ptr [N / 2] gets SiLU(gate) * up
    (_gated)."""
    BN: tl.constexpr = TN * 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_tiles = K // 128
    per = tl.cdiv(k_tiles, SPLIT_K)  # k-tiles of a share
    kt_lo = pid_k * per
    if GATE:  # gate rows r, then up rows N / 2 + r
        j = tl.arange(0, BN)
        r = pid_n * (BN // 2) + j % (BN // 2)
        n = r + (j // (BN // 2)) * (N // 2)
        n_ok = r < N // 2
    else:
        n = pid_n * BN + tl.arange(0, BN)  # weight rows
        n_ok = n < N
    lw = tl.arange(0, 16)  # a row's word 4 l + w of a tile: columns 32 w + 2 l + 8 i + lo, nibble i + 4 lo
    pair = 16 * (lw % 4) + lw // 4  # x's column pair (32 w + 2 l) / 2 of nibble 0; + 4 i for nibble i
    words0 = 0
    sz0 = 0
    if PRELOAD:  # the weights and scales are no kernel's output: read while the kernel before ends
        kt0 = kt_lo + tl.arange(0, BKT)
        ok0 = (kt0 < kt_lo + per) & (kt0 < k_tiles)
        words0 = _words(p_ptr, k_tiles, kt0, ok0, n, n_ok, lw, ROWS_FIRST)
        sz0 = _scales(sz32, N, kt0, ok0, n, n_ok, G, ROWS_FIRST)
    if PDL:
        # the weights are no kernel's output: their reading starts while the kernel before ends
        if PREFETCH > 0:
            for t in tl.static_range(TN):
                if GATE:  # the program's gate tiles, then its up tiles (N / 2 a multiple of 8)
                    tile_row = (t // (TN // 2)) * (N // 16) + pid_n * (TN // 2) + t % (TN // 2)
                else:
                    tile_row = pid_n * TN + t
                if (tile_row * 8 < N) & (kt_lo < k_tiles):
                    prefetch_l2(p_ptr + (tile_row * k_tiles + kt_lo) * 128,
                                (tl.minimum(per, k_tiles - kt_lo) * (128 * PREFETCH)).to(tl.int32))
        tl.extra.cuda.gdc_wait()
        if not LATE:
            tl.extra.cuda.gdc_launch_dependents()
    res = 0.0
    if NORM:  # the residual rows (an earlier kernel's output: after the wait), loaded while the K loop runs
        res = tl.load(res_ptr + n, mask=n_ok, other=0.0)
    y = _k_loop(x32, p_ptr, sz32, N, k_tiles, kt_lo, per, n, n_ok, lw, pair, words0, sz0, G, BN, BKT, ROWS_FIRST,
                PRELOAD, KS, XW, EMULATE)
    if PDL and LATE:
        tl.extra.cuda.gdc_launch_dependents()
    if SPLIT_K == 1:
        if NORM:
            _add_norm(y, res, n, n_ok, N, y_ptr, g_ptr, xn_ptr, ss_ptr, grid_count_ptr, eps, PB, NB, AHEAD)
        elif GATE:
            _gated(y, pid_n, N // 2, y_ptr, BN, EMULATE)
        else:
            tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        # serial split K: every thread's sums stored before the count (a barrier), the count
        # acquire-release at GPU scope, so the program that counts last sees every share's sums; it
        # adds them in share order (the same bits every call, unlike atomics adding them in the
        # order they come) and writes y itself: one launch, no zeroed fp32 output and no cast after
        tl.store(ws_ptr + pid_k * N + n, y, mask=n_ok)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            tl.store(count_ptr + pid_n, 0)
            total = tl.load(ws_ptr + n, mask=n_ok, other=0.0, cache_modifier=".cg")
            for share in tl.static_range(1, SPLIT_K):
                total += tl.load(ws_ptr + share * N + n, mask=n_ok, other=0.0, cache_modifier=".cg")
            if NORM:
                _add_norm(total, res, n, n_ok, N, y_ptr, g_ptr, xn_ptr, ss_ptr, grid_count_ptr, eps, PB, NB, AHEAD)
            elif GATE:
                _gated(total, pid_n, N // 2, y_ptr, BN, EMULATE)
            else:
                tl.store(y_ptr + n, total.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gated(y, pid_n, half, y_ptr, BN: tl.constexpr, EMULATE: tl.constexpr):
    """A GATE program's sums `y` (fp32; its BN / 2 gate rows, then the same up rows) as the
    decoder's MLP takes them: SiLU(gate) * up, rounded to fp16 where eager PyTorch rounds (gate and
    up, SiLU's output, the product), SiLU as x / (1 + exp(-x)) in fp32 with libdevice's exp and an
    IEEE division (ATen's SiLU bit for bit; inductor's kernel for FastDecoder._gate computes the same
    where its eager_numerics.division_rounding exists, which decoder.inductor_options sets; the
    interpreter's exp in EMULATE)."""
    gate, up = tl.split(tl.trans(tl.reshape(y.to(tl.float16).to(tl.float32), (2, BN // 2))))
    if EMULATE:
        e = tl.exp(-gate)
    else:
        e = libdevice.exp(-gate)
    act = tl.math.div_rn(gate, 1.0 + e).to(tl.float16).to(tl.float32)  # IEEE division, as ATen's (`/`: approximate)
    r = pid_n * (BN // 2) + tl.arange(0, BN // 2)
    tl.store(y_ptr + r, (act * up).to(tl.float16), mask=r < half)


@triton.jit
def _add_norm(y, res, n, n_ok, N, h_ptr, g_ptr, xn_ptr, ss_ptr, grid_count_ptr, eps, PB: tl.constexpr,
              NB: tl.constexpr, AHEAD: tl.constexpr):
    """A row block's sums `y` (fp32) of a one-row GEMV whose output goes into the residual stream
    (its rows `res`, fp16) and then through RMSNorm (a decoder layer's o_proj or down_proj): h = res + y and
    xn = g * (h * rsqrt(mean(h^2) + eps)), rounded to fp16 where eager PyTorch rounds (y, h, the
    normalized h, xn), written to h_ptr and xn_ptr. Each row block stores its sum of h^2 in
    ss_ptr; the block that counts last in grid_count_ptr (one int32, zero; set back to zero) sums
    them in block order (the same bits every call) and normalizes all N of h: the next layer's
    norm in this launch's tail instead of a kernel of its own. The mean sums in another order than
    eager's (as the "eager-casts" numerics allow: bench.engines.spec.NUMERICS), and compiled for a
    GPU its squares go into fused multiply-adds unrounded (eager rounds each to fp32). NB: the elements
    normalized at once (the whole row up to NORM_CHUNK: one round trip to L2 for the row and the
    weight); AHEAD (NORM_AHEAD): the first NB of them asked for before the sums are added, so the
    last block waits for one round trip after its count, not two."""
    h = (res.to(tl.float32) + y.to(tl.float16).to(tl.float32)).to(tl.float16)
    tl.store(h_ptr + n, h, mask=n_ok)
    hf = h.to(tl.float32)
    tl.store(ss_ptr + tl.program_id(0), tl.sum(tl.where(n_ok, hf * hf, 0.0), axis=0))
    # as split K's shares: stored before the count (a barrier), the count acquire-release at GPU
    # scope, so the block that counts last sees every block's h and sum
    tl.debug_barrier()
    blocks = tl.num_programs(0)
    if tl.atomic_add(grid_count_ptr, 1, sem="acq_rel", scope="gpu") == blocks - 1:
        tl.store(grid_count_ptr, 0)
        first = 0
        if AHEAD:  # the first NB of h and the weight asked for with the sums: one round trip to L2, not two
            i, ok, hv, gv = _tail_pass(h_ptr, g_ptr, 0, N, NB)
            first = NB
        b = tl.arange(0, PB)
        ss = tl.load(ss_ptr + b, mask=b < blocks, other=0.0, cache_modifier=".cg")
        inv = tl.math.rsqrt(tl.math.div_rn(tl.sum(ss, axis=0), N.to(tl.float32)) + eps)
        if AHEAD:
            _normed_store(hv, gv, inv, xn_ptr, i, ok)
        for start in tl.range(first, N, NB):
            i, ok, hv, gv = _tail_pass(h_ptr, g_ptr, start, N, NB)
            _normed_store(hv, gv, inv, xn_ptr, i, ok)


@triton.jit
def _tail_pass(h_ptr, g_ptr, start, N, NB: tl.constexpr):
    """One pass of the add-and-norm tail: its elements' indices from `start`, which of them are in
    the row, and their h (past L1: other blocks wrote it) and norm weight, fp16."""
    i = start + tl.arange(0, NB)
    ok = i < N
    return (i, ok, tl.load(h_ptr + i, mask=ok, other=0.0, cache_modifier=".cg"),
            tl.load(g_ptr + i, mask=ok, other=0.0))


@triton.jit
def _normed_store(hv, gv, inv, xn_ptr, i, ok):
    """xn[i] = g * (h * inv), rounded to fp16 where eager PyTorch's RMSNorm rounds (h, g fp16)."""
    normed = (hv.to(tl.float32) * inv).to(tl.float16).to(tl.float32)
    tl.store(xn_ptr + i, (normed * gv.to(tl.float32)).to(tl.float16), mask=ok)


# The K loops the tuning tries, each "KS" or "KSw": KS its stages, 1 (a step's loads issued at its
# top and waited for at once; ptxas keeps them there: more loads issued ahead in registers are sunk
# back to their use) or 2 to 4 (Triton's pipeliner copies the next KS - 1 steps' words, scales and x
# into shared memory asynchronously, cp.async, while a step multiplies); `w`: x read by whole
# k-tiles, contiguously, and put in the words' order in registers (through shared memory) instead of
# gathered word by word (XW, _xs). A program's loads in flight are what its SM's share of the
# memory's bandwidth needs where the grid is a few programs per SM (o_proj's 512 of 8 rows on 132
# SMs); the copies cost instructions, x's one by one most (lab/triton_tiles_h2.py aot
# --product-configs counts them in sm_90 SASS). On an H100 x read by whole k-tiles won llava-1.5-7b's
# qkv, o and down shapes (unpipelined), the plain loop its gate/up shape, and the step with all four
# loops to choose from was shorter than with 1 and 3 alone in every round
# (results/lab/h100/f16x2_stages_h100_xw.csv, f16x2-stages_ab_xw_llava-1.5-7b.csv; split
# configurations untimed); lab/triton_tiles_h2.py gpu --product-configs times every loop per shape
# without split, and lab/gpu_step_ab.py --ab f16x2-stages the step with a choice of them.
K_LOOPS = ("1", "3", "1w", "3w")


def loop_name(kwargs: dict) -> str:
    """A configuration's K loop as K_LOOPS spells it."""
    return f"{kwargs.get('KS', 1)}{'w' if kwargs.get('XW') else ''}"


def k_loops() -> tuple[str, ...]:
    """K_LOOPS checked and sorted (the same choice however it is written); ValueError naming what
    is wrong: not a tuple or list, empty, or a loop no configuration has."""
    loops = K_LOOPS
    if not isinstance(loops, (tuple, list)) or not loops or not set(loops) <= set(LOOP_NAMES):
        raise ValueError(f"bench.quant.triton_f16x2.K_LOOPS {loops!r}: a tuple of K loops, each of "
                         f"{', '.join(LOOP_NAMES)}")
    return tuple(sorted(set(loops)))


def _configs(split: bool) -> list:
    """The candidates (pruned per shape by _prune), kept few: each compiles once, and every shape
    benchmarks those left on its first call. Those that won a shape of llava-1.5-7b or
    vila1.5-3b on an H100 in either layout (lab/triton_tiles_h2.py gpu, which times many more):
    without split, rows first with one or two row blocks and rows last with two or four; split,
    both layouts with one or two; each with every K loop (_prune keeps those K_LOOPS names when it
    is called)."""
    if split:
        space = [(rows_first, tn, 4, 4) for rows_first in (True, False) for tn in (1, 2)]
        splits = (2, 4)
    else:
        space = [(True, 1, 4, 4), (True, 1, 8, 8), (True, 2, 4, 4), (True, 2, 8, 8),
                 (False, 2, 4, 4), (False, 4, 4, 4), (False, 4, 4, 8)]
        splits = (1,)
    return [triton.Config({"TN": tn, "BKT": bkt, "SPLIT_K": sk, "ROWS_FIRST": rows_first, "KS": ks, "XW": xw},
                          num_warps=w, num_stages=3)
            for rows_first, tn, bkt, w in space for sk in splits for ks in (1, 2, 3, 4) for xw in (False, True)]


LOOP_NAMES = tuple(dict.fromkeys(loop_name(c.kwargs) for c in _configs(split=False)))  # every K loop there is
SPLIT_SHARES = tuple(sorted({c.kwargs["SPLIT_K"] for c in _configs(split=True)}))  # the shares a split may have

# The K splits triton-f16x2's tuning tries besides all of K in one program (each of SPLIT_SHARES;
# the split configurations of _configs): with the shares summed by the program that finishes last
# (no atomics, no extra launch) a split costs a store and a load of fp32 sums per share and row.
# None by default: on an H100 the tuning with splits 2 and 4 to choose from chose no split at any
# of llava-1.5-7b's four shapes (results/lab/h100/f16x2_splits_llava-1.5-7b.csv), so the step
# was the same (f16x2-splits_ab_llava-1.5-7b.csv), and the candidates would double its tuning.
# lab/gpu_step_ab.py --ab f16x2-splits times the step with other choices,
# lab/gpu_f16x2_tuning_spread.py --graph-splits the tuning's choice per shape.
SPLITS = ()


def splits() -> tuple[int, ...]:
    """SPLITS checked and sorted; ValueError naming what is wrong: not a tuple or list, or a
    split no configuration has (empty: no split)."""
    chosen = SPLITS
    if not isinstance(chosen, (tuple, list)) or not set(chosen) <= set(SPLIT_SHARES):
        raise ValueError(f"bench.quant.triton_f16x2.SPLITS {chosen!r}: a tuple of K splits, each of "
                         f"{', '.join(map(str, SPLIT_SHARES))} (empty: none)")
    return tuple(sorted(set(chosen)))


def candidates(split: bool) -> list:
    """What a tuning chooses among before pruning: split K's configurations (split), or those
    without split and the split ones whose shares SPLITS names."""
    if split:
        return _configs(True)
    return _configs(False) + [c for c in _configs(True) if c.kwargs["SPLIT_K"] in splits()]


def launch_config(candidate: triton.Config) -> dict:
    """A candidate (_configs) as f16x2_mm's and _launch's `config` take it."""
    return {**candidate.kwargs, "num_warps": candidate.num_warps, "num_stages": candidate.num_stages}


def _prune(configs, k: int, loops: tuple[str, ...], gate: bool = False):
    """Those of `configs` with one of `loops` (as k_loops() gives them; never none: every loop
    _configs has) whose share of K (`k` columns) is at least one block of k-tiles, or the one with
    the fewest k-tiles a share; for `gate` (GATE) those with an even TN only (every layout has some)."""
    k_tiles = k // 128
    looped = [c for c in configs if loop_name(c.kwargs) in loops and not (gate and c.kwargs["TN"] % 2)]
    kept = [c for c in looped if c.kwargs["SPLIT_K"] * c.kwargs["BKT"] <= max(k_tiles, 1)]
    return kept or [min(looped, key=lambda c: c.kwargs["SPLIT_K"] * c.kwargs["BKT"])]


# The configuration each shape runs with, chosen by _tune on its first call and kept for the process:
# tuning_key -> the launch configuration
_TUNED: dict[tuple, dict] = {}


def tuning_key(device: torch.device, n: int, k: int, group_size: int, split: bool, pdl: dict,
               gate: bool = False) -> tuple:
    """What a tuning is kept under: the device, the shape, split K or not, the PDL launch settings,
    the K loops and the splits tried without split K (k_loops(), splits(): a change of K_LOOPS or
    SPLITS in a process tunes afresh), and "gate" last for the gated launch (_gated: tuned apart,
    among even TNs, so its sums may be in another order than the plain launch's at the shape)."""
    key = (device, n, k, group_size, split, pdl["PDL"], pdl["PREFETCH"], pdl["PRELOAD"], pdl["LATE"],
           k_loops(), () if split else splits())
    return (*key, "gate") if gate else key


# Per device, split K's scratch (fp32 sums of every share, int32 counts per row block: zeros, each
# set back to zero by the program that counted last), shared by every launch on the device, so two
# must never run at once (two streams; the engines run their layers on one). Allocated outside any
# CUDA graph capture and never freed, since captured launches keep their address; one too small is
# replaced, the old one kept alive for the graphs holding it. The first holds SCRATCH_SUMS sums and
# SCRATCH_COUNTS counts (1 MB and 32 KB): 4 shares of 65536 rows, enough for every preset's decoder
# shapes (llava-1.5-7b's largest, gate/up: 4 x 22016 sums, 2752 counts), so one is all they make.
SCRATCH_SUMS, SCRATCH_COUNTS = 1 << 18, 1 << 13
_SCRATCH: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _scratch(device: torch.device, sums: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 sums, zeroed int32 counts) of at least `sums` and `blocks` on `device`; RuntimeError
    while a capture is under way and none is large enough (the shape's first call, before any
    capture, makes them)."""
    return _held(_SCRATCH.setdefault(device, []), device, max(sums, SCRATCH_SUMS), max(blocks, SCRATCH_COUNTS),
                 "split K")


def _held(held: list, device: torch.device, sums: int, counts: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The last of `held` (a device's scratch, oldest first) if it has at least `sums` fp32 sums
    and `counts` int32 counts, else a new one large enough for it and for what the last one held,
    appended (the old ones kept for the graphs holding them); RuntimeError naming `what` while a
    capture is under way and a new one is needed."""
    if held and held[-1][0].numel() >= sums and held[-1][1].numel() >= counts:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"triton-f16x2's {what} needs scratch memory larger than any call before the capture "
                           "made: call it once at this shape before capturing")
    if held:
        sums, counts = max(sums, held[-1][0].numel()), max(counts, held[-1][1].numel())
    held.append((torch.empty(sums, dtype=torch.float32, device=device),
                 torch.zeros(counts, dtype=torch.int32, device=device)))
    return held[-1]


# Per device, the add-and-norm epilogue's scratch (_add_norm: fp32 sums of h^2 per row block, one
# int32 count, zero, set back to zero by the block that counted last), shared by every launch as
# split K's is (_scratch): allocated outside any capture and never freed; one too small is
# replaced, the old one kept alive for the graphs holding it. The first holds NORM_BLOCKS sums: a
# hidden size up to 16384 at row blocks of 8 rows, every preset's.
NORM_BLOCKS = 2048
# The add-and-norm tail's elements a pass (_add_norm's NB: the whole hidden row of every preset, up
# to 8192), and whether its last block asks for the first pass's h and weight together with the row
# blocks' sums (NORM_AHEAD) or after adding them; read at each launch. The same bits either way:
# lab/gpu_step_ab.py --ab norm-ahead times the folded step both ways.
NORM_CHUNK = 8192
NORM_AHEAD = True
_NORM_SCRATCH: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _norm_scratch(device: torch.device, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 sums of at least `blocks`, zeroed int32 count) for _add_norm on `device`;
    RuntimeError while a capture is under way and none is large enough."""
    return _held(_NORM_SCRATCH.setdefault(device, []), device, max(blocks, NORM_BLOCKS), 1, "add-and-norm")


def _launch(x32, packed, sz32, n: int, k: int, group_size: int, config: dict, pdl: dict,
            emulate: bool = False, norm: tuple | None = None, gate: bool = False):
    """One launch with `config` (TN, BKT, SPLIT_K, ROWS_FIRST (default True), KS, XW, num_warps,
    num_stages; PRELOAD; left as it is) -> y [N] float16 (split K: summed in the kernel, _scratch);
    with `norm` (residual [N], weight [N], eps; float16 but eps) -> (residual + y, its RMSNorm:
    _add_norm); with `gate` (an even TN) -> SiLU(y[:N/2]) * y[N/2:] [N / 2] (_gated)."""
    config = {"ROWS_FIRST": True, **config}  # may name PRELOAD (tests: the interpreter runs no PDL)
    launch = {"num_warps": config.pop("num_warps", 4), "num_stages": config.pop("num_stages", 3),
              **{name: v for name, v in pdl.items() if name not in config}}
    y = torch.empty(n // 2 if gate else n, dtype=torch.float16, device=x32.device)
    grid = (triton.cdiv(y.numel(), (4 if gate else 8) * config["TN"]), config["SPLIT_K"])
    ws, counts = _scratch(x32.device, config["SPLIT_K"] * n, grid[0]) if config["SPLIT_K"] > 1 else (None, None)
    if norm is None:
        _f16x2_kernel[grid](x32, packed, sz32, y, ws, counts, n, k, G=group_size, EMULATE=emulate, **config, **launch,
                            GATE=gate)
        return y
    residual, weight, eps = norm
    sums, count = _norm_scratch(x32.device, grid[0])
    xn = torch.empty(n, dtype=torch.float16, device=x32.device)
    _f16x2_kernel[grid](x32, packed, sz32, y, ws, counts, n, k, G=group_size, EMULATE=emulate, **config, **launch,
                        res_ptr=residual, g_ptr=weight, xn_ptr=xn, ss_ptr=sums, grid_count_ptr=count, eps=eps,
                        NORM=True, PB=triton.next_power_of_2(grid[0]),
                        NB=min(triton.next_power_of_2(n), NORM_CHUNK),
                        AHEAD=bool(NORM_AHEAD))
    return y, xn


def _tune(x32, packed, sz32, n: int, k: int, group_size: int, split: bool, pdl: dict, gate: bool = False) -> dict:
    """The fastest of the candidates _prune keeps for this shape and the K loops (split K or
    not; `gate`: as _launch's), each timed as a decode step runs it: calls captured back to back in a CUDA graph
    (bench.measure.timing.call_us) with the launch's PDL settings, cycling through copies of the
    weight past the L2 cache (timing.copies_past_l2; fewer where memory runs short), so each call
    reads its weight from memory as a step's layers do.

    A candidate Triton cannot compile or launch here is passed over, as Triton's autotuner does.

    Not Triton's autotuner (which this kernel had up to b0f85fb): its benchmark times each call
    alone after a write that flushes L2, and on an H100 that ranked the candidates far from their
    times in a graph and chose differently from one tuning to the next: for llava-1.5-7b's down
    projection a configuration of 16.4 us in five tunings of six, where this tuning chose one of
    12.0 in six of six (results/lab/h100/f16x2_tuning_spread_llava-1.5-7b.csv); three processes'
    int4 steps took 2.34, 2.34 and 2.38 ms (f16x2_autotuner_processes_llava-1.5-7b.csv)."""
    from bench.measure.timing import call_us, copies_past_l2

    if x32.device.type != "cuda":
        raise ValueError("triton-f16x2 tunes on CUDA only: name a `config` elsewhere")
    configs = _prune(candidates(split), k, k_loops(), gate)
    want = copies_past_l2(x32.device, packed.numel() * packed.element_size() + sz32.numel() * sz32.element_size())
    copies = [(packed, sz32)]
    try:
        while len(copies) < want:
            copies.append((packed.clone(), sz32.clone()))
    except torch.cuda.OutOfMemoryError:  # fewer copies (one given back for the captures): partly read from L2
        if len(copies) > 1:
            copies.pop()
    calls = len(copies) * -(-32 // len(copies))  # a whole number of rounds over the copies, at least 32 calls
    best = None
    for candidate in configs:
        config = launch_config(candidate)
        turn = itertools.cycle(copies)
        try:
            us = call_us(lambda: _launch(x32, *next(turn), n, k, group_size, config, pdl, gate=gate), x32.device,
                         calls=calls)
        except (OutOfResources, PTXASError):  # too many registers or too much shared memory for this GPU
            continue
        if best is None or us < best[0]:
            best = (us, config)
    del copies
    if best is None:
        raise RuntimeError(f"triton-f16x2: no candidate configuration runs on this GPU at {n}x{k}")
    return best[1]


def f16x2_mm(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
             group_size: int, split_k: bool, config: dict | None = None, emulate: bool = False) -> torch.Tensor:
    """x [M, K] float16 times the packed int4 weight [N = out_features, K]^T -> [M, N] float16
    (scale_and_zero [K / group_size, N, 2] float16, group_size a multiple of 128), a row at a time
    (a GEMV: `--int4-kernels measured` times it at one row only; a fixed `--int4-kernels` runs its
    calls of more rows row by row). `split_k`: tuned among split K's configurations only (else
    among those without split and SPLITS' split ones). `config` (TN, BKT, SPLIT_K, ROWS_FIRST
    (default True), KS (default 1), XW (default False), num_warps, num_stages; PRELOAD) skips the
    tuning, `emulate`
    runs the interpreter's stand-in for the PTX (tests). Under PDL the programs preload their
    first block of weights before the wait where bench.pdl.PRELOAD says so."""
    x = _checked(x, scale_and_zero, group_size)
    if x.shape[0] != 1:
        return torch.cat([f16x2_mm(x[i:i + 1], packed, scale_and_zero, out_features, group_size, split_k, config,
                                   emulate) for i in range(x.shape[0])])
    return _call(x, packed, scale_and_zero, out_features, group_size, split_k, config, emulate).view(1, out_features)


def f16x2_mm_add_norm(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
                      group_size: int, split_k: bool, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      config: dict | None = None, emulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """f16x2_mm of one row x [1, K] added to `residual` [1, N] and put through RMSNorm with
    `weight` [N] (all float16) in the same launch (_add_norm): (h, xn) [1, N] float16, h =
    residual + y and xn = weight * (h * rsqrt(mean(h^2) + eps)) rounded as eager PyTorch rounds
    each op (the mean summed in another order). Tuned and configured as f16x2_mm at the shape."""
    x = _checked(x, scale_and_zero, group_size)
    n = out_features
    if x.shape[0] != 1 or residual.shape != (1, n) or weight.shape != (n,):
        raise ValueError(f"f16x2_mm_add_norm takes one row, a residual [1, {n}] and a weight [{n}]; got "
                         f"{tuple(x.shape)}, {tuple(residual.shape)}, {tuple(weight.shape)}")
    if residual.dtype != torch.float16 or weight.dtype != torch.float16:
        raise ValueError("f16x2_mm_add_norm takes a float16 residual and norm weight")
    norm = (residual.contiguous().view(n), weight.contiguous(), float(eps))
    h, xn = _call(x, packed, scale_and_zero, n, group_size, split_k, config, emulate, norm)
    return h.view(1, n), xn.view(1, n)


def f16x2_mm_gated(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor, out_features: int,
                   group_size: int, split_k: bool, config: dict | None = None, emulate: bool = False) -> torch.Tensor:
    """SiLU(gate) * up [1, out_features / 2] float16 of one row x [1, K] through a fused gate/up
    weight (its first out_features / 2 rows the gate projection's, the rest the up projection's;
    out_features / 2 a multiple of 8) in one launch (_gated): the decoder's MLP input, rounded as
    eager PyTorch rounds each op. Tuned on its first call at the shape as f16x2_mm, among the
    configurations with an even TN (a tuning of its own); `config` as f16x2_mm's, with an even TN."""
    x = _checked(x, scale_and_zero, group_size)
    if x.shape[0] != 1 or out_features % 16:
        raise ValueError(f"f16x2_mm_gated takes one row and a gate/up weight of a multiple of 16 rows; got "
                         f"{tuple(x.shape)} and {out_features} rows")
    if config is not None and config["TN"] % 2:
        raise ValueError(f"f16x2_mm_gated takes an even TN, not {config['TN']}")
    out = _call(x, packed, scale_and_zero, out_features, group_size, split_k, config, emulate, gate=True)
    return out.view(1, out_features // 2)


def _checked(x: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """x as the kernel reads it (contiguous, its column pairs int32-aligned); ValueError for
    what it does not take."""
    if x.dtype != torch.float16 or scale_and_zero.dtype != torch.float16 or group_size % 128:
        raise ValueError("f16x2_mm takes float16 activations, scales and zeros, and groups of a multiple of 128")
    x = x.contiguous()
    if x.storage_offset() % 2:  # its column pairs are read as int32 words
        x = x.clone()
    return x


def _call(x, packed, scale_and_zero, out_features: int, group_size: int, split_k: bool, config: dict | None,
          emulate: bool, norm: tuple | None = None, gate: bool = False):
    """One row's launch (_launch), the shape tuned on its first call unless `config` is given."""
    k, n = x.shape[1], out_features
    x32 = x.view(torch.int32)
    sz32 = scale_and_zero.view(torch.int32)
    args = (x32, packed, sz32, n, k, group_size)
    # PDL always named: it keys the tunings (a configuration tuned without PDL is not taken with it)
    on = not emulate and pdl_enabled(x.device)
    quarters = pdl_settings.PREFETCH
    if on and (isinstance(quarters, bool) or quarters not in range(5)):
        raise ValueError(f"bench.pdl.PREFETCH {quarters!r}: quarters of a program's weights, 0 to 4")
    pdl = {"PDL": on, "PREFETCH": quarters if on else 0, "PRELOAD": on and bool(pdl_settings.PRELOAD),
           "LATE": on and bool(pdl_settings.LATE), **({"launch_pdl": True} if on else {})}
    if config is None:
        key = tuning_key(x.device, n, k, group_size, split_k, pdl, gate)
        if key not in _TUNED:
            if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("triton-f16x2 tunes on its first call at a shape, which a CUDA graph capture "
                                   "must not contain: call it once before capturing")
            _TUNED[key] = _tune(*args, split_k, pdl, gate)
        config = _TUNED[key]
    return _launch(*args, config, pdl, emulate, norm, gate)


def tuning_count() -> int:
    """Shapes tuned so far (compile_events counts a tuning inside a measured run)."""
    return len(_TUNED)

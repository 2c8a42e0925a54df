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
rows; with `split_k` also one per share of K, the shares added into an fp32 output by atomics.
The layout, block sizes, warps, splits and K loop are tuned per (N, K) on the first call (_tune:
timed in CUDA graphs, host-synchronized, so never inside a capture; the kernel class asks to be
called once before any capture, bench.quant.w4a16.f16x2). float16 activations, groups of 128 or
more. Hand-written because no maintained library multiplies by this layout.

In Triton's interpreter (no PTX there) EMULATE runs the same index math with the f16x2 block done
in fp32 Triton operations: the tests check the layout with it, and the PTX on a GPU.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
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
def _f16x2_kernel(x32, p_ptr, sz32, y_ptr, N, K, G: tl.constexpr, TN: tl.constexpr, BKT: tl.constexpr,
                  SPLIT_K: tl.constexpr, ROWS_FIRST: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr = False,
                  PREFETCH: tl.constexpr = 4, PRELOAD: tl.constexpr = False, KS: tl.constexpr = 1,
                  XW: tl.constexpr = False):
    """y[n] = sum_k x[k] W[n, k] for one row of x, given as int32 column pairs (x32 [K / 2]),
    the scales and zeros as int32 pairs (sz32 [K / G, N]); the program's words laid out rows
    first or rows last (ROWS_FIRST). PDL: launched with programmatic dependent launch (bench.pdl):
    wait for the kernel before (asking L2 first for the first PREFETCH quarters of the program's
    weights, bench.pdl.PREFETCH), then let the next one start. PRELOAD: the first block of the
    program's weights and scales is loaded (into registers) before that wait (bench.pdl.PRELOAD).
    KS, XW: the K loop (K_LOOPS)."""
    BN: tl.constexpr = TN * 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_tiles = K // 128
    per = tl.cdiv(k_tiles, SPLIT_K)  # k-tiles of a share
    kt_lo = pid_k * per
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
                tile_row = pid_n * TN + t
                if (tile_row * 8 < N) & (kt_lo < k_tiles):
                    prefetch_l2(p_ptr + (tile_row * k_tiles + kt_lo) * 128,
                                (tl.minimum(per, k_tiles - kt_lo) * (128 * PREFETCH)).to(tl.int32))
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    y = _k_loop(x32, p_ptr, sz32, N, k_tiles, kt_lo, per, n, n_ok, lw, pair, words0, sz0, G, BN, BKT, ROWS_FIRST,
                PRELOAD, KS, XW, EMULATE)
    if SPLIT_K == 1:
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(y_ptr + n, y, mask=n_ok, sem="relaxed")


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


def launch_config(candidate: triton.Config) -> dict:
    """A candidate (_configs) as f16x2_mm's and _launch's `config` take it."""
    return {**candidate.kwargs, "num_warps": candidate.num_warps, "num_stages": candidate.num_stages}


def _prune(configs, k: int, loops: tuple[str, ...]):
    """Those of `configs` with one of `loops` (as k_loops() gives them; never none: every loop
    _configs has) whose share of K (`k` columns) is at least one block of k-tiles, or the one with
    the fewest k-tiles a share."""
    k_tiles = k // 128
    looped = [c for c in configs if loop_name(c.kwargs) in loops]
    kept = [c for c in looped if c.kwargs["SPLIT_K"] * c.kwargs["BKT"] <= max(k_tiles, 1)]
    return kept or [min(looped, key=lambda c: c.kwargs["SPLIT_K"] * c.kwargs["BKT"])]


# The configuration each shape runs with, chosen by _tune on its first call and kept for the process:
# tuning_key -> the launch configuration
_TUNED: dict[tuple, dict] = {}


def tuning_key(device: torch.device, n: int, k: int, group_size: int, split: bool, pdl: dict) -> tuple:
    """What a tuning is kept under: the device, the shape, split K or not, the PDL launch settings
    and the K loops (k_loops(): a change of K_LOOPS in a process tunes afresh)."""
    return (device, n, k, group_size, split, pdl["PDL"], pdl["PREFETCH"], pdl["PRELOAD"], k_loops())


def _launch(x32, packed, sz32, n: int, k: int, group_size: int, config: dict, pdl: dict,
            emulate: bool = False) -> torch.Tensor:
    """One launch with `config` (TN, BKT, SPLIT_K, ROWS_FIRST (default True), KS, XW, num_warps,
    num_stages; PRELOAD; left as it is) -> y [N] (fp32 under split K, which the kernel's atomics add
    into zeros)."""
    config = {"ROWS_FIRST": True, **config}  # may name PRELOAD (tests: the interpreter runs no PDL)
    launch = {"num_warps": config.pop("num_warps", 4), "num_stages": config.pop("num_stages", 3),
              **{name: v for name, v in pdl.items() if name not in config}}
    split = config["SPLIT_K"] > 1
    y = torch.zeros(n, dtype=torch.float32, device=x32.device) if split else \
        torch.empty(n, dtype=torch.float16, device=x32.device)
    grid = (triton.cdiv(n, 8 * config["TN"]), config["SPLIT_K"])
    _f16x2_kernel[grid](x32, packed, sz32, y, n, k, G=group_size, EMULATE=emulate, **config, **launch)
    return y


def _tune(x32, packed, sz32, n: int, k: int, group_size: int, split: bool, pdl: dict) -> dict:
    """The fastest of the candidates _prune keeps for this shape and the K loops (split K or
    not), each timed as a decode step runs it: calls captured back to back in a CUDA graph
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
    configs = _prune(_configs(split), k, k_loops())
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
            us = call_us(lambda: _launch(x32, *next(turn), n, k, group_size, config, pdl), x32.device,
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
    calls of more rows row by row). `config` (TN, BKT, SPLIT_K, ROWS_FIRST (default True), KS
    (default 1), XW (default False), num_warps, num_stages; PRELOAD) skips the tuning, `emulate`
    runs the interpreter's stand-in for the PTX (tests). Under PDL the programs preload their
    first block of weights before the wait where bench.pdl.PRELOAD says so."""
    if x.dtype != torch.float16 or scale_and_zero.dtype != torch.float16 or group_size % 128:
        raise ValueError("f16x2_mm takes float16 activations, scales and zeros, and groups of a multiple of 128")
    x = x.contiguous()
    if x.storage_offset() % 2:  # its column pairs are read as int32 words
        x = x.clone()
    if x.shape[0] != 1:
        return torch.cat([f16x2_mm(x[i:i + 1], packed, scale_and_zero, out_features, group_size, split_k, config,
                                   emulate) for i in range(x.shape[0])])
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
           **({"launch_pdl": True} if on else {})}
    if config is None:
        key = tuning_key(x.device, n, k, group_size, split_k, pdl)
        if key not in _TUNED:
            if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("triton-f16x2 tunes on its first call at a shape, which a CUDA graph capture "
                                   "must not contain: call it once before capturing")
            _TUNED[key] = _tune(*args, split_k, pdl)
        config = _TUNED[key]
    y = _launch(*args, config, pdl, emulate)
    return (y.half() if y.dtype == torch.float32 else y).view(1, n)


def tuning_count() -> int:
    """Shapes tuned so far (compile_events counts a tuning inside a measured run)."""
    return len(_TUNED)

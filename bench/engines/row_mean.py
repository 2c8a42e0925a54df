"""`x.mean(-1, keepdim=True)` of a float32 CUDA tensor summed in the exact order of ATen's own
reduction kernel, as one Triton program per row, so its result is bit-identical to ATen's.

Why: transformers' RMSNorm takes `hidden.pow(2).mean(-1)`, and the exact engine (graph-exact)
must reproduce it bit for bit. ATen's kernel for a few thousand columns and 16 or more rows runs
16 rows per 512-thread block, one warp per row: 2 blocks for a 19-token suffix, each warp
summing 128 values per lane in a dependent chain. On the H200 that took 9.3 us per norm, 0.61 ms
of llava-1.5-7b's 6.4 ms warm suffix (f67f436:results/h200/warm_profile_llava-1.5-7b-graph-exact-rows.csv).
No library offers an order-preserving reduction, hence this kernel.

The order (ATen's Reduce.cuh, `input_vectorized_thread_reduce_impl` and `block_x_reduce`,
for a contiguous row of H >= 128 float32 values, H % 4 == 0, 16-byte aligned):
- a row is reduced by L "lanes" (ReduceConfig.block_width: 32 for 16+ rows; 512 / the largest
  power of two <= rows below that, at most the largest power of two <= H / 4);
- lane l reads the 4-float vectors l, l + L, l + 2L, ... and keeps one running sum per vector
  element j (4 sums, each in vector order, starting from 0);
- then combines them ((s0 + s1) + s2) + s3;
- then the lanes are combined by halving: lane l adds lane l + L/2, then l + L/4, ... down to
  l + 1 (shared memory above a warp, warp shuffles below; torch's CUDA build shuffles with
  decreasing offsets, `LANE_ORDERS[0]`; ROCm and older builds with increasing ones inside a warp,
  `LANE_ORDERS[1]`);
- lane 0's sum times float32(rows) / float32(rows * H) (= float32(1 / H)) is the mean.
ATen splits a row across warps (another order) when a lane would get
min(16 x rows-per-block, 256) or more values; `aten_lanes` returns None then and callers keep
ATen's kernel. Nothing here is trusted blindly: `ordered_row_mean` uses the kernel for a shape
only after it matched ATen bit for bit on this device (`matches_aten`), else ATen runs.
"""
from __future__ import annotations

from functools import lru_cache

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch: ATen's mean runs (the CPU has its own order anyway)
    triton = None

MAX_THREADS = 512  # ReduceConfig's thread count for 4-byte accumulators (the kernel's `reduce_kernel<512, 1>`)
VEC = 4  # float32 values per vectorized load (16 bytes)
LANE_ORDERS = ("halving", "halving-then-adjacent")


def _last_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


@lru_cache(maxsize=256)
def aten_lanes(rows: int, cols: int) -> int | None:
    """ReduceConfig's block_width for a vectorized mean of `rows` rows of `cols` float32 values,
    or None where this module does not reproduce ATen (unvectorized, or split across warps)."""
    if cols < 128 or cols % VEC:
        return None
    dim0 = cols // VEC
    dim0_pow2 = _last_pow2(dim0) if dim0 < MAX_THREADS else MAX_THREADS
    dim1_pow2 = _last_pow2(rows) if rows < MAX_THREADS else MAX_THREADS
    width = min(dim0_pow2, 32)
    height = min(dim1_pow2, MAX_THREADS // width)
    width = min(dim0_pow2, MAX_THREADS // height)
    values_per_thread = -(-cols // width)  # ReduceConfig counts elements, not vectors
    if values_per_thread >= min(height * 16, 256):  # input split across warps: another order
        return None
    return width


if triton is not None:
    @triton.jit
    def _row_mean_kernel(x_ptr, out_ptr, row_stride, factor, COLS: tl.constexpr, LANES: tl.constexpr,
                         ITERS: tl.constexpr, LOG2_LANES: tl.constexpr, ADJACENT_BELOW: tl.constexpr):
        row = tl.program_id(0)
        lane = tl.arange(0, LANES)[:, None]
        elem = tl.arange(0, 4)[None, :]
        base = x_ptr + row.to(tl.int64) * row_stride
        acc = tl.zeros([LANES, 4], dtype=tl.float32)
        for i in tl.static_range(ITERS):  # unrolled: the loads issue together, the adds stay in order
            vec = i * LANES + lane
            acc += tl.load(base + vec * 4 + elem, mask=vec * 4 < COLS, other=0.0)
        # ((s0 + s1) + s2) + s3 per lane (a sum of one value and zeros is that value)
        s = tl.sum(tl.where(elem == 0, acc, 0.0), axis=1) + tl.sum(tl.where(elem == 1, acc, 0.0), axis=1)
        s = s + tl.sum(tl.where(elem == 2, acc, 0.0), axis=1)
        s = s + tl.sum(tl.where(elem == 3, acc, 0.0), axis=1)
        # lanes: lane l += lane l + half, halving (a sum over an axis of 2 is one exact-order add)
        for k in tl.static_range(LOG2_LANES):  # the lanes left after this step: LANES >> (k + 1)
            if (LANES >> (k + 1)) < ADJACENT_BELOW:  # inside a warp, increasing offsets: neighbours pair first
                s = tl.sum(tl.reshape(s, (LANES >> (k + 1), 2)), axis=1)
            else:
                s = tl.sum(tl.reshape(s, (2, LANES >> (k + 1))), axis=0)
        tl.store(out_ptr + row, tl.sum(s, axis=0) * factor)


def ordered_mean(x: torch.Tensor, order: str = LANE_ORDERS[0]) -> torch.Tensor:
    """The Triton kernel's x.mean(-1, keepdim=True) (x: float32, CUDA, rows contiguous, 16-byte
    aligned; `aten_lanes` not None for its shape)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    lanes = aten_lanes(rows, cols)
    if lanes is None or x.dtype != torch.float32 or x.stride(-1) != 1 or x.data_ptr() % 16:
        raise ValueError(f"no ATen-order kernel for a {tuple(x.shape)} {x.dtype} tensor")
    flat = x.reshape(rows, cols)
    if flat.data_ptr() != x.data_ptr() or (rows > 1 and flat.stride(0) % VEC):
        raise ValueError("rows must be contiguous and 16-byte aligned")
    out = torch.empty(rows, device=x.device, dtype=torch.float32)
    factor = _factor(rows, cols)
    adjacent_below = 32 if order == LANE_ORDERS[1] else 0
    _row_mean_kernel[(rows,)](flat, out, flat.stride(0), factor, COLS=cols, LANES=lanes,
                              ITERS=-(-(cols // VEC) // lanes), LOG2_LANES=lanes.bit_length() - 1,
                              ADJACENT_BELOW=adjacent_below, num_warps=max(1, min(lanes // 32, 4)))
    return out.view(*x.shape[:-1], 1)


@lru_cache(maxsize=256)
def _factor(rows: int, cols: int) -> float:
    """MeanOps' factor as ATen's mean kernel computes it: float32(rows) / float32(rows * cols)."""
    return float(torch.tensor(rows, dtype=torch.float32) / torch.tensor(rows * cols, dtype=torch.float32))


_matched: dict[tuple, str | None] = {}  # (device, lanes, cols) -> lane order matching ATen, None: neither


def matches_aten(rows: int, cols: int, device, draws: int = 4) -> str | None:
    """The lane order in which the kernel equals ATen's mean bit for bit for `rows` x `cols`
    float32 on `device` (random squares of several magnitudes, `draws` times), or None. The
    answer holds for every row count with the same `aten_lanes` (the order depends on nothing
    else) and is kept per (device, lanes, cols)."""
    lanes = aten_lanes(rows, cols)
    key = (str(device), lanes, cols)
    if key not in _matched:
        gen = torch.Generator(device=device).manual_seed(rows * 7919 + cols)
        xs = [torch.randn(rows, cols, device=device, generator=gen) ** 2
              * torch.logspace(-4, 4, rows, device=device)[:, None] for _ in range(draws)]
        wants = [x.mean(-1, keepdim=True) for x in xs]
        _matched[key] = next((o for o in LANE_ORDERS
                              if all(torch.equal(ordered_mean(x, o), w) for x, w in zip(xs, wants))), None)
    return _matched[key]


def ordered_row_mean(x: torch.Tensor) -> torch.Tensor:
    """x.mean(-1, keepdim=True), bit-identical to ATen's: the Triton kernel where it matched ATen
    at this configuration (checked the first time, never inside a CUDA graph capture), else ATen."""
    if triton is None or x.device.type != "cuda" or x.dtype != torch.float32 or not x.is_contiguous() \
            or x.data_ptr() % 16 or x.numel() == 0:
        return x.mean(-1, keepdim=True)
    cols = x.shape[-1]
    lanes = aten_lanes(x.numel() // cols, cols)
    if lanes is None:
        return x.mean(-1, keepdim=True)
    key = (str(x.device), lanes, cols)
    if key not in _matched and torch.cuda.is_current_stream_capturing():
        return x.mean(-1, keepdim=True)  # not checked yet: no probing inside a capture
    order = matches_aten(x.numel() // cols, cols, x.device)
    return x.mean(-1, keepdim=True) if order is None else ordered_mean(x, order)


def describe() -> str:
    """Where the kernel ran in place of ATen's so far, for engine_detail ('' if nowhere)."""
    used = sorted((cols, lanes) for (_, lanes, cols), order in _matched.items() if order is not None)
    if not used:
        return ""
    return "row means by an ATen-order Triton kernel (bit-equal) at " + ", ".join(
        f"{cols} columns/{lanes} lanes" for cols, lanes in used)

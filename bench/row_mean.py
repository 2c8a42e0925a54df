"""transformers' RMSNorm (`weight * (x * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`) as one
Triton program per row whose mean sums in the exact order of ATen's own reduction kernel, so its
output is bit-identical to the eager ops (`eager_rms_norm`) that the hf engine runs.

Why: the exact engine (graph-exact) must reproduce that norm bit for bit. ATen's mean kernel for a
few thousand columns and 16 or more rows runs 16 rows per 512-thread block, one warp per row: 2
blocks for a 19-token suffix, each warp summing 128 values per lane in a dependent chain. On the
H200 that took 9.3 us per norm, 0.61 ms of llava-1.5-7b's 6.4 ms warm suffix
(results/h200/warm_profile_llava-1.5-7b-graph-exact-rows.csv); with inductor's kernels around it a
norm was three kernels. No library offers an order-preserving reduction, hence these kernels.

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
min(16 x rows-per-block, 256) or more values; `aten_lanes` returns None then and the eager ops run.
`ordered_mean` is the mean alone (the order's test: Triton's interpreter on the CPU, ATen on
CUDA). Nothing is trusted blindly: `exact_rms_norm` runs the fused kernel at a configuration only
after it matched `eager_rms_norm` bit for bit on this device (`norm_matches_eager`), else the
eager ops run.
"""
from __future__ import annotations

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
    from triton.language.extra import libdevice

    @triton.jit
    def _aten_order_sum(base, COLS: tl.constexpr, LANES: tl.constexpr, ITERS: tl.constexpr,
                        LOG2_LANES: tl.constexpr, ADJACENT_BELOW: tl.constexpr, SQUARE: tl.constexpr):
        """The sum of one row (of its float32 squares if SQUARE) in ATen's order (module docstring)."""
        lane = tl.arange(0, LANES)[:, None]
        elem = tl.arange(0, 4)[None, :]
        acc = tl.zeros([LANES, 4], dtype=tl.float32)
        for i in tl.static_range(ITERS):  # unrolled: the loads issue together, the adds stay in order
            vec = i * LANES + lane
            v = tl.load(base + vec * 4 + elem, mask=vec * 4 < COLS, other=0.0).to(tl.float32)
            if SQUARE:
                v = v * v  # ATen's pow(2): one multiplication
            acc += v
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
        return tl.sum(s, axis=0)

    @triton.jit
    def _row_mean_kernel(x_ptr, out_ptr, row_stride, factor, COLS: tl.constexpr, LANES: tl.constexpr,
                         ITERS: tl.constexpr, LOG2_LANES: tl.constexpr, ADJACENT_BELOW: tl.constexpr):
        row = tl.program_id(0)
        base = x_ptr + row.to(tl.int64) * row_stride
        total = _aten_order_sum(base, COLS, LANES, ITERS, LOG2_LANES, ADJACENT_BELOW, False)
        tl.store(out_ptr + row, total * factor)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, row_stride, factor, eps, COLS: tl.constexpr, LANES: tl.constexpr,
                         ITERS: tl.constexpr, LOG2_LANES: tl.constexpr, ADJACENT_BELOW: tl.constexpr):
        """transformers' RMSNorm of one row: weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), each
        op rounding where ATen's does (launched without FMA contraction)."""
        row = tl.program_id(0)
        base = x_ptr + row.to(tl.int64) * row_stride
        variance = _aten_order_sum(base, COLS, LANES, ITERS, LOG2_LANES, ADJACENT_BELOW, True) * factor
        r = libdevice.rsqrt(variance + eps)  # what inductor's and ATen's rsqrt call (__nv_rsqrtf)
        cols = tl.arange(0, LANES * 4)
        for i in tl.static_range(ITERS):
            c = i * LANES * 4 + cols
            x = tl.load(base + c, mask=c < COLS, other=0.0)
            w = tl.load(w_ptr + c, mask=c < COLS, other=0.0)
            y = (x.to(tl.float32) * r).to(x.dtype)
            tl.store(out_ptr + row.to(tl.int64) * COLS + c, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype),
                     mask=c < COLS)


def _launch_shape(rows: int, cols: int, order: str) -> dict:
    lanes = aten_lanes(rows, cols)
    return dict(COLS=cols, LANES=lanes, ITERS=-(-(cols // VEC) // lanes), LOG2_LANES=lanes.bit_length() - 1,
                ADJACENT_BELOW=32 if order == LANE_ORDERS[1] else 0, num_warps=max(1, min(lanes // 32, 4)))


def _factor(rows: int, cols: int) -> float:
    """MeanOps' factor: float32(rows) / float32(rows * cols), as ATen's mean kernel computes it."""
    return float(torch.tensor(rows, dtype=torch.float32) / torch.tensor(rows * cols, dtype=torch.float32))


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
    _row_mean_kernel[(rows,)](flat, out, flat.stride(0), _factor(rows, cols), **_launch_shape(rows, cols, order))
    return out.view(*x.shape[:-1], 1)


# ------------------------------------------------------------------------ the whole RMSNorm
def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen2RMSNorm forward, op for op (ATen's kernels)."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, order: str = LANE_ORDERS[0]) -> torch.Tensor:
    """eager_rms_norm as one Triton program per row (x fp16/bf16 contiguous on CUDA, weight of its
    dtype, `aten_lanes` not None for its shape)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    if aten_lanes(rows, cols) is None or not x.is_contiguous() or x.data_ptr() % 16 \
            or x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype or weight.shape != (cols,):
        raise ValueError(f"no fused RMSNorm for a {tuple(x.shape)} {x.dtype} tensor")
    out = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](x, weight.contiguous(), out, cols, _factor(rows, cols), eps,
                              enable_fp_fusion=False, **_launch_shape(rows, cols, order))
    return out


_norm_matched: dict[tuple, str | None] = {}  # (device, lanes, cols, dtype, eps) -> lane order, None: neither


def norm_matches_eager(rows: int, cols: int, dtype: torch.dtype, eps: float, device, draws: int = 4) -> str | None:
    """The lane order in which fused_rms_norm equals eager_rms_norm bit for bit for `rows` x
    `cols` inputs of `dtype` on `device` (random rows of several magnitudes and a random weight,
    `draws` times), or None; kept per (device, lanes, cols, dtype, eps)."""
    key = (str(device), aten_lanes(rows, cols), cols, dtype, eps)
    if key not in _norm_matched:
        gen = torch.Generator(device=device).manual_seed(rows * 7919 + cols)
        xs = [(torch.randn(rows, cols, device=device, generator=gen)
               * torch.logspace(-2, 2, rows, device=device)[:, None]).to(dtype) for _ in range(draws)]
        w = (1 + 0.1 * torch.randn(cols, device=device, generator=gen)).to(dtype)
        wants = [eager_rms_norm(x, w, eps) for x in xs]
        _norm_matched[key] = next((o for o in LANE_ORDERS
                                   if all(torch.equal(fused_rms_norm(x, w, eps, o), want) for x, want in zip(xs, wants))),
                                  None)
    return _norm_matched[key]


def exact_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """eager_rms_norm's result: by fused_rms_norm where it matched it bit for bit at this
    configuration (checked the first time, never inside a CUDA graph capture), else op for op."""
    cols = x.shape[-1]
    rows = x.numel() // max(cols, 1)
    if triton is None or x.device.type != "cuda" or x.numel() == 0 or aten_lanes(rows, cols) is None \
            or not x.is_contiguous() or x.data_ptr() % 16 or x.dtype not in (torch.float16, torch.bfloat16) \
            or weight.dtype != x.dtype:
        return eager_rms_norm(x, weight, eps)
    key = (str(x.device), aten_lanes(rows, cols), cols, x.dtype, eps)
    if key not in _norm_matched and torch.cuda.is_current_stream_capturing():
        return eager_rms_norm(x, weight, eps)  # not checked yet: no probing inside a capture
    order = norm_matches_eager(rows, cols, x.dtype, eps, x.device)
    return eager_rms_norm(x, weight, eps) if order is None else fused_rms_norm(x, weight, eps, order)


def describe() -> str:
    """Where the fused RMSNorm ran in place of ATen's ops so far, for engine_detail ('' if nowhere)."""
    used = sorted({(cols, lanes) for (_, lanes, cols, _, _), order in _norm_matched.items() if order is not None})
    if not used:
        return ""
    return "RMSNorms by an ATen-order Triton kernel (bit-equal) at " + ", ".join(
        f"{cols} columns/{lanes} lanes" for cols, lanes in used)

"""Group-wise int4 weights and the linear layer that runs them.

Quantization parameters come from torchao's affine primitives (asymmetric, integer zero point,
the AutoAWQ convention: w = (q - z) * s per group of `group_size` input channels).

The layer has two paths, picked per call by the number of rows (tokens) it sees (kernel_at), and
under a measured plan by whether a prompt's prefill calls it (`prefilling`: the prefill path at
any rows, where one is set up):
- few rows (decode, short suffixes): a W4A16 kernel reads int4 weights. By default PyTorch's
  tinygemm up to dense_rows; `--int4-kernels` sets another kernel or one measured per row count
  (bench.quant.w4a16: the kernels, and the measured choice per device and shape);
- more rows (prefill): by default the weight is dequantized to the activation dtype and a dense
  GEMM runs (`--int4-prefill-kernel` names a W4A16 kernel to run there instead): int4
  kernels are fast at a few rows and slow at many (docs/int4.md). No dense copy is kept unless
  asked for (--int4-prefill-copy).

Kernels: the default int4 path is PyTorch's tinygemm, the kernel torchao's int4 tensors call
(`_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on the CPU), called directly
rather than through Int4TilePackedTo4dTensor / Int4OpaqueTensor because those have no
dequantize (the dense path needs one) and the CUDA one pads K to a multiple of 1024 on every
call. The dense path on CUDA is the Triton kernel of bench.quant.triton_int4; on the CPU plain
torch ops (tests only). Neither packed layout is documented as a formula, so it is learnt by
packing coordinate-encoded matrices (each position's index, one 4-bit digit at a time) and
reading back where every index landed.

Kernels tried on the H200 and dropped, with their numbers: docs/int4.md.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from bench.quant import DEFAULT_DENSE_ROWS
from bench.quant.w4a16.registry import DEFAULT_KERNEL, KERNELS
from bench.measure.compile_events import note_capture
from bench.measure.capture import capturing

try:
    from bench.quant import triton_int4 as _triton_int4
except ImportError:  # no Triton (CPU builds of torch): the dense path uses plain torch ops
    _triton_int4 = None

QMIN, QMAX = 0, 15
TINYGEMM_MID = 8  # tinygemm dequantizes as (q - 8) * scale + zero_f


# ---------------------------------------------------------------------------- quantization
@dataclass
class Int4Tensors:
    """Unpacked group-wise int4 weight: q [N, K] in 0..15, scale and zero [N, K/group]."""

    q: torch.Tensor  # int32
    scale: torch.Tensor  # float
    zero: torch.Tensor  # int32
    group_size: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        g = self.group_size
        n, k = self.q.shape
        w = (self.q.view(n, k // g, g) - self.zero.unsqueeze(-1)).to(torch.float32) * self.scale.float().unsqueeze(-1)
        return w.view(n, k).to(dtype)


GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm kernels take


def layer_group_size(in_features: int, group_size: int, out_features: int | None = None,
                     device: torch.device | None = None) -> int | None:
    """The group size a linear with `in_features` inputs is quantized with when `group_size` is
    asked for: `group_size` when it divides in_features, else the largest smaller supported size
    that does (finer groups: never less accurate); None when none does, or when the int4 kernel of
    `device` cannot take the layer's shape (CUDA's tiles: CUDA_TILE): the layer stays dense."""
    if device is not None and device.type == "cuda" and (
            in_features % CUDA_TILE[1] or (out_features is not None and out_features % CUDA_TILE[0])):
        return None
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= group_size and in_features % g == 0:
            return g
    return None


def quantize_int4(weight: torch.Tensor, group_size: int) -> Int4Tensors:
    """Round-to-nearest asymmetric int4, one (scale, zero) per `group_size` inputs of a row."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = weight.detach().float()
    block = (1, group_size)
    scale, zero = choose_qparams_affine(w, MappingType.ASYMMETRIC, block, torch.int32, QMIN, QMAX,
                                        eps=1e-6, scale_dtype=torch.float32, zero_point_dtype=torch.int32)
    # Checkpoints store scales in fp16 (AutoAWQ): round here so a saved model equals this one.
    scale = scale.clamp(min=6.2e-5).to(torch.float16).float()
    q = quantize_affine(w, block, scale, zero, torch.int32, QMIN, QMAX)
    return Int4Tensors(q, scale.view(n, k // group_size), zero.view(n, k // group_size), group_size)


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """quantize then dequantize (float32): what the int4 layer will compute with."""
    return quantize_int4(weight, group_size).dequantize(torch.float32)


# ---------------------------------------------------------------------------- kernel layouts
KERNEL_STATE_PREFIX = "kernel_"  # buffers holding a kernel's own weight format: kernel_<state key>_<tensor>


def is_extra_buffer(name: str) -> bool:
    """Whether the (dotted) buffer name is one an int4 layer holds beside its weight: the prefill
    scratch slot (bench.quant.prefetch) or a kernel's own weight format (int4_kernel_mb)."""
    leaf = name.rpartition(".")[2]
    return leaf == "prefill_weight" or leaf.startswith(KERNEL_STATE_PREFIX)


CUDA_INNER_K_TILES = 8  # tinygemm tiles: 8 rows x 16*8 = 128 columns; K must be a multiple of 128
CUDA_TILE = (8, 16 * CUDA_INNER_K_TILES)


def _pack_nibbles(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """q int32 [N, K] (0..15) -> the int4 kernel's packed weight on `device`."""
    if device.type == "cuda":
        n, k = q.shape
        if k % CUDA_TILE[1] or n % CUDA_TILE[0]:
            raise ValueError(f"the CUDA int4 kernel needs out_features % 8 == 0 and in_features % 128 == 0, "
                             f"got {n}x{k}")
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous().to(device)
        return torch.ops.aten._convert_weight_to_int4pack(u8, CUDA_INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous().cpu(), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit field of a packed tensor in memory order (low nibble of each byte first)."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(-1)


def _probe(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Source index (row-major into [n, k]) of every nibble the packer writes, as int64."""
    total = n * k
    idx = torch.arange(total, device=device)
    where = torch.zeros(total, dtype=torch.long, device=device)
    for d in range(max(1, math.ceil(math.log2(total) / 4))):
        digit = ((idx >> (4 * d)) & 15).view(n, k).to(torch.int32)
        where |= _nibbles(_pack_nibbles(digit, device)).long() << (4 * d)
    if not torch.equal(torch.sort(where).values, idx):
        raise RuntimeError(f"int4 kernel layout probe for {n}x{k} is not a permutation")
    return where


def tinygemm_tile_source() -> torch.Tensor:
    """Row-major position in its 8 x 128 tile of each of the tile's 1024 nibbles, in memory order,
    as PyTorch's packer defines it (_convert_weight_to_int4pack_cuda, 8 inner k-tiles: lane l of
    32 owns row l // 4; its word w of 4 holds the columns 32 w + 2 (l % 4) + 8 i + lo, i = 0..3,
    in nibble i + 4 lo). The Triton dequantizer builds this in; KernelLayout checks it against
    what the packer of this build actually writes."""
    m = torch.arange(CUDA_TILE[0] * CUDA_TILE[1])
    nib, word, lane = m % 8, (m // 8) % 4, m // 32
    col = 32 * word + 2 * (lane % 4) + 8 * (nib % 4) + nib // 4
    return (lane // 4) * CUDA_TILE[1] + col


class KernelLayout:
    """How to turn a packed weight back into q [N, K] for one (device type, N, K).

    CUDA (tinygemm): each 8 x 128 tile of the weight packs into its own 128 int32 words, in an
    order learnt once from an 8 x 128 probe and checked on a 2 x 2-tile probe; `published` says
    whether that order is tinygemm_tile_source() (the fast dequantizer's assumption). CPU: one
    probe of the whole shape (tests only; the CPU layout is not tile-local)."""

    def __init__(self, n: int, k: int, device: torch.device):
        self.n, self.k, self.device = n, k, device
        if device.type == "cuda":
            self.block = bn, bk = CUDA_TILE
            where = _probe(bn, bk, device)
            big = _probe(2 * bn, 2 * bk, device).view(2, 2, bn * bk)
            r, c = where // bk, where % bk
            for i in range(2):
                for j in range(2):
                    if not torch.equal(big[i, j], (i * bn + r) * (2 * bk) + (j * bk + c)):
                        raise RuntimeError("tinygemm int4 layout is not tile-local on this build; "
                                           "the dense prefill path cannot unpack it")
        else:
            self.block = None
            where = _probe(n, k, device)
        self.published = device.type == "cuda" and torch.equal(where.cpu(), tinygemm_tile_source())
        self.inverse = torch.argsort(where).to(torch.int32 if where.numel() < 2**31 else torch.long)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """packed -> q [N, K] as uint8."""
        return unpack_q(packed, self.inverse, self.n, self.k, self.block)


def unpack_q(packed: torch.Tensor, inverse: torch.Tensor, n: int, k: int, block) -> torch.Tensor:
    nib = _nibbles(packed)
    if block is None:
        return nib[inverse.long()].view(n, k)
    bn, bk = block
    tiles = nib.view(n // bn, k // bk, bn * bk)
    q = tiles.index_select(-1, inverse.long()).view(n // bn, k // bk, bn, bk)
    return q.permute(0, 2, 1, 3).reshape(n, k)


# Weak: a scratch buffer lives as long as some layer holds it, so it goes with its model.
_DENSE_SCRATCH: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


@lru_cache(maxsize=None)
def _dense_pool():
    return torch.cuda.graph_pool_handle()


@lru_cache(maxsize=None)
def kernel_layout(n: int, k: int, device: torch.device) -> KernelLayout:
    return KernelLayout(n, k, device)


@lru_cache(maxsize=None)
def kernel_accepts(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tinygemm on `device` takes activations of `dtype` (CUDA builds differ)."""
    if device.type != "cuda":
        return dtype in (torch.float32, torch.float16, torch.bfloat16)
    try:
        packed = _pack_nibbles(torch.zeros(8, 128, dtype=torch.int32), device)
        sz = torch.ones(1, 8, 2, dtype=dtype, device=device)
        torch.ops.aten._weight_int4pack_mm(torch.ones(1, 128, dtype=dtype, device=device), packed, 128, sz)
        return True
    except RuntimeError:
        return False


def _dequantize_packed(packed: torch.Tensor, inverse: torch.Tensor, scale_and_zero: torch.Tensor, n: int, k: int,
                       block, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    q = unpack_q(packed, inverse, n, k, block)
    sz = scale_and_zero.to(dtype).transpose(0, 1)  # [N, K/g, 2]
    w = (q.view(n, k // group_size, group_size).to(dtype) - TINYGEMM_MID) * sz[..., :1] + sz[..., 1:]
    return w.view(n, k)


# Per packed weight: its dequantize graph (and the scratch it writes), while the weight lives.
_DENSE_GRAPHS: dict[tuple, tuple] = {}


def _cuda_dense_weight(packed: torch.Tensor, scale_and_zero: torch.Tensor, lay: KernelLayout, group_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """Dequantize into a scratch buffer shared by every layer of this shape (one layer's weight
    is alive at a time: stream order makes the next layer's write wait for this GEMM).

    The dequantize launch is replayed from a CUDA graph captured on first use: prefill runs
    eagerly and is CPU-bound, and Triton's Python launch path costs more CPU per call than a
    graph replay (a 7B prefill makes 224 of these calls)."""
    dequantize_tinygemm = _triton_int4.dequantize_tinygemm
    n, k = lay.n, lay.k
    key = (n, k, dtype, packed.device)
    out = _DENSE_SCRATCH.get(key)
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=packed.device)
        _DENSE_SCRATCH[key] = out
    args = (packed, scale_and_zero, lay.inverse, out, group_size, lay.published)
    if torch.cuda.is_current_stream_capturing():  # inside someone else's graph: launch directly
        return dequantize_tinygemm(*args)
    gkey = (packed.data_ptr(), tuple(packed.shape), dtype)
    entry = _DENSE_GRAPHS.get(gkey)
    if entry is None or entry[0]() is None or entry[2] is not out:
        for dead in [k_ for k_, e in _DENSE_GRAPHS.items() if e[0]() is None]:
            del _DENSE_GRAPHS[dead]  # weights freed: their graphs (and scratch refs) go too
        dequantize_tinygemm(*args)  # compiles the kernel outside the capture
        graph = torch.cuda.CUDAGraph()
        note_capture()
        with capturing(graph, pool=_dense_pool()):
            dequantize_tinygemm(*args)
        entry = _DENSE_GRAPHS[gkey] = (weakref.ref(packed), graph, out)
    entry[1].replay()
    return out


def dense_weight(packed: torch.Tensor, scale_and_zero: torch.Tensor, n: int, k: int, group_size: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The [n, k] weight in `dtype`: the Triton dequantizer on CUDA, plain torch on the CPU."""
    lay = kernel_layout(n, k, packed.device)
    if packed.is_cuda:
        return _cuda_dense_weight(packed, scale_and_zero, lay, group_size, dtype)
    return _dequantize_packed(packed, lay.inverse, scale_and_zero, n, k, lay.block, group_size, dtype)


@torch.library.custom_op("vlm_bench::int4_dense_linear", mutates_args=())
def int4_dense_linear(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor,
                      bias: torch.Tensor | None, out_features: int, group_size: int) -> torch.Tensor:
    """Dequantize + dense GEMM (the prefill path) as one opaque op, so torch.compile keeps a
    layer with int4 linears in one graph instead of breaking it at every call."""
    return F.linear(x, dense_weight(packed, scale_and_zero, out_features, x.shape[-1], group_size, x.dtype), bias)


@int4_dense_linear.register_fake
def _(x, packed, scale_and_zero, bias, out_features, group_size):
    return x.new_empty(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------- the layer
class Int4Linear(nn.Module):
    """y = x @ W^T (+ b) with W held as group-wise int4 (see the module docstring for the paths).

    `input_scale` (AWQ's 1/s, where it could not be folded into the previous layer) multiplies x.
    Buffers: packed (the tinygemm kernel's layout for this device) + scale_and_zero [K/G, N, 2]
    (tinygemm's convention: w = (q - 8) * scale + zero).

    `trace_dense`: compiled code traces the CUDA dense path (Triton dequantize + GEMM) instead of
    calling the opaque custom op; False keeps the op (lab/gpu_int4_prefill_profile.py compares
    the two). Read when a layer compiles.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, packed: torch.Tensor,
                 scale_and_zero: torch.Tensor,
                 bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 dense_rows: int = DEFAULT_DENSE_ROWS, trace_dense: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.dense_rows = dense_rows
        self.trace_dense = trace_dense
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", input_scale)
        # CUDA: the tile permutation the Triton dequantizer reads (one shared 4 KiB tensor per
        # weight shape), held here so compiled code sees a buffer, not a cache lookup.
        lay = kernel_layout(out_features, in_features, packed.device) if packed.is_cuda else None
        self.register_buffer("tile_inverse", None if lay is None else lay.inverse, persistent=False)
        self.published_layout = lay is not None and lay.published  # the fast dequantizer applies
        # A dense copy of this weight made ahead of a prefill (bench.quant.prefetch), read by the
        # dense path while `read_prefill_weight` is on (DensePrefetch.reading: only while a prefill
        # runs with its weights prefetched); a slot shared with other layers. Compiled code reads
        # the flag when traced, so the prefill's compiled layer reads the slot and the captured
        # steps' layer does not.
        self.register_buffer("prefill_weight", None, persistent=False)
        self.read_prefill_weight = False
        # On while an engine's prompt prefill from column 0 calls this layer (`prefilling`):
        # under a measured row plan such a call runs the prefill path at any rows
        # where one is set up for this layer (a prefill kernel chosen, or its dense weight
        # prefetched or copied; _prefill_path), since the plan's rows above a decode step's are a
        # batch's suffixes entered together. Compiled code reads it when traced, as
        # `read_prefill_weight`.
        self.prefilling = False
        # --int4-prefill-copy: this weight dense, kept for every call above dense_rows (prefill at
        # the dense model's speed, for the dense model's weight memory on top of the int4 one).
        self.register_buffer("dense_copy", None, persistent=False)
        # The kernel per row count (kernel_at; --int4-kernels): `kernel` up to dense_rows unless
        # a measured `row_plan` says otherwise; per kernel weight format other than `packed`
        # (bench.quant.w4a16: state_key), its non-tensor arguments; its tensors are the buffers
        # kernel_<state_key>_<name>.
        self.kernel = DEFAULT_KERNEL
        self.prefill_kernel = "dense"  # above the plan (--int4-prefill-kernel)
        self.row_plan: tuple[tuple[int, str], ...] | None = None
        self.kernel_meta: dict[str, object] = {}

    @classmethod
    def from_int4(cls, t: Int4Tensors, device: torch.device, dtype: torch.dtype, bias=None, input_scale=None,
                  dense_rows: int = DEFAULT_DENSE_ROWS) -> "Int4Linear":
        n, k = t.q.shape
        scale = t.scale.float().to(device)
        kdtype = dtype if kernel_accepts(dtype, device) else torch.bfloat16
        zero_f = (TINYGEMM_MID - t.zero.to(device).float()) * scale  # (q-8)*s + (8-z)*s = (q-z)*s
        sz = torch.stack((scale, zero_f), dim=-1).transpose(0, 1).contiguous().to(kdtype)  # [K/g, N, 2]
        return cls(k, n, t.group_size, _pack_nibbles(t.q, device), sz,
                   None if bias is None else bias.detach().to(device, dtype),
                   None if input_scale is None else input_scale.detach().to(device, dtype), dense_rows)

    @property
    def layout(self) -> KernelLayout:
        return kernel_layout(self.out_features, self.in_features, self.packed.device)

    def to_int4(self, on_device: bool = False) -> Int4Tensors:
        """Back to (q, scale, integer zero): what checkpoints store; on the host unless `on_device`."""
        q = self.layout.unpack(self.packed).to(torch.int32)
        sz = self.scale_and_zero.transpose(0, 1).float()
        scale = sz[..., 0]
        zero = torch.round(TINYGEMM_MID - sz[..., 1] / scale).to(torch.int32)
        if on_device:
            return Int4Tensors(q, scale, zero, self.group_size)
        return Int4Tensors(q.cpu(), scale.cpu(), zero.cpu(), self.group_size)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dense_weight(self.packed, self.scale_and_zero, self.out_features, self.in_features,
                            self.group_size, dtype)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the dense weight into `out` ([N, K], its dtype): the Triton dequantizer straight
        into it on CUDA (capturable), plain torch ops on the CPU."""
        if self.tile_inverse is not None:
            return _triton_int4.dequantize_tinygemm(self.packed, self.scale_and_zero, self.tile_inverse, out,
                                                    self.group_size, self.published_layout)
        return out.copy_(self.dense_weight(out.dtype))

    def _prefill_path(self) -> bool:
        """Whether this call, at whatever rows, runs `prefill_kernel`: a prefill's call under a
        measured plan where the prefill path is set up for this layer (--int4-prefill-kernel
        given it, or its dense weight prefetched for this prefill or kept as a copy)."""
        return self.prefilling and self.row_plan is not None and (
            self.prefill_kernel != "dense" or self.dense_copy is not None
            or (self.read_prefill_weight and self.prefill_weight is not None))

    @staticmethod
    @contextmanager
    def prefill_calls(layers):
        """Within: `layers` are called by a prefill (`prefilling`); not after."""
        for m in layers:
            m.prefilling = True
        try:
            yield
        finally:
            for m in layers:
                m.prefilling = False

    def kernel_at(self, rows: int) -> str:
        """The kernel (bench.quant.w4a16.registry name) a call of `rows` rows runs: `row_plan`'s
        first entry whose row bound takes it; without a plan `kernel` up to dense_rows (read per
        call, so a changed dense_rows moves the bound). Above the plan (or dense_rows):
        `prefill_kernel`, by default "dense" (the dequantizing prefill path)."""
        if self.row_plan is None:
            return self.kernel if rows <= self.dense_rows else self.prefill_kernel
        for top, name in self.row_plan:
            if rows <= top:
                return name
        return self.prefill_kernel

    def add_norm_kernel(self, rows: int):
        """The kernel a call of `rows` rows runs if that kernel can also add the output to the
        residual stream and normalize it in the same launch (`run_add_norm`: triton-f16x2 at one
        row) and this layer has no bias or input scale to apply; else None."""
        if self.bias is not None or self.input_scale is not None or self._prefill_path():
            return None
        kernel = KERNELS[self.kernel_at(rows)]
        return kernel if hasattr(kernel, "run_add_norm") and rows <= (kernel.max_rows or rows) else None

    def gate_kernel(self, rows: int):
        """For a fused gate/up layer (its first half of rows the gate projection's): the kernel a call of
        `rows` rows runs if that kernel can also apply SiLU to the gate half and multiply by the up
        half in the same launch (`run_gated`: triton-f16x2 at one row), each half a multiple of 8
        rows and no bias or input scale to apply; else None."""
        if self.out_features % 16:
            return None
        kernel = self.add_norm_kernel(rows)
        return kernel if hasattr(kernel, "run_gated") else None

    def decode_rows(self) -> int:
        """The most rows a call runs the decode kernels at (the plan's last bound, else
        dense_rows); calls of more rows run `prefill_kernel`, and so do a prompt prefill's calls
        under a measured plan where the prefill path is set up (_prefill_path)."""
        if self.row_plan is None:
            return self.dense_rows
        return self.row_plan[-1][0] if self.row_plan else 0

    def set_row_plan(self, plan: tuple[tuple[int, str], ...] | None, dtype: torch.dtype,
                     kernel: str = DEFAULT_KERNEL) -> None:
        """Run `plan` ((max rows, kernel name), ascending) from now on, or without one (None)
        `kernel` up to dense_rows: the kernels' own weight formats are made (or kept) for the
        kernels it names, the others' dropped."""
        self.kernel = kernel if plan is None else DEFAULT_KERNEL
        self.row_plan = None if plan is None else tuple((int(top), str(name)) for top, name in plan)
        self._sync_kernel_states(dtype)

    def set_prefill_kernel(self, name: str, dtype: torch.dtype) -> None:
        """Run kernel `name` for the calls above the plan (prefill) instead of the dense path."""
        self.prefill_kernel = name
        self._sync_kernel_states(dtype)

    def _sync_kernel_states(self, dtype: torch.dtype) -> None:
        """Hold the weight formats of exactly the kernels this layer may run."""
        names = {self.kernel, self.prefill_kernel, "dense", *(name for _, name in self.row_plan or ())}
        keys = {KERNELS[n].state_key for n in names} - {None}
        for key in set(self.kernel_meta) - keys:
            self.drop_kernel_state(key)
        for n in names:
            self.attach_kernel_state(n, dtype)

    def attach_kernel_state(self, name: str, dtype: torch.dtype) -> None:
        """Make kernel `name`'s own weight format from this layer's codes, unless it is held already."""
        kernel = KERNELS[name]
        key = kernel.state_key
        if key is None or key in self.kernel_meta:
            return
        tensors, meta = kernel.prepare(self, dtype)
        for n, t in tensors.items():
            self.register_buffer(f"{KERNEL_STATE_PREFIX}{key}_{n}", t, persistent=False)
        self.kernel_meta[key] = meta

    def kernel_state(self, key: str, *names: str) -> list[torch.Tensor]:
        """The tensors `names` of the weight format held under state key `key`."""
        return [getattr(self, f"{KERNEL_STATE_PREFIX}{key}_{n}") for n in names]

    def drop_kernel_state(self, key: str) -> None:
        prefix = f"{KERNEL_STATE_PREFIX}{key}_"
        for n in [n for n, _ in self.named_buffers(recurse=False) if n.startswith(prefix)]:
            delattr(self, n)
        self.kernel_meta.pop(key, None)

    def kernel_state_bytes(self) -> int:
        """Bytes of the kernels' own weight formats this layer holds (beside its packed weight)."""
        return sum(t.numel() * t.element_size() for n, t in self.named_buffers(recurse=False)
                   if n.startswith(KERNEL_STATE_PREFIX) and t is not None)

    def dense_forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ bias) with W dense: the prefill path (a kept dense copy, a prefetched slot,
        the traced dequantizer when compiling on CUDA, else one opaque dequantize + GEMM op)."""
        if self.dense_copy is not None:
            return F.linear(x, self.dense_copy, bias)
        if self.read_prefill_weight and self.prefill_weight is not None:
            return F.linear(x, self.prefill_weight, bias)
        if self.trace_dense and self.tile_inverse is not None and torch.compiler.is_compiling():
            # Compiled (the graph engine's prefill and suffix buckets): traced, so inductor
            # launches the dequantizer itself; see triton_int4.dequantize_traceable.
            w = _triton_int4.dequantize_traceable(self.packed, self.scale_and_zero, self.tile_inverse,
                                                  self.out_features, self.in_features, self.group_size, x.dtype,
                                                  self.published_layout)
            return F.linear(x, w, bias)
        # Eager: one opaque op (a captured dequantize replayed, scratch shared by layers).
        return torch.ops.vlm_bench.int4_dense_linear(x, self.packed, self.scale_and_zero, bias,
                                                     self.out_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        rows = x.numel() // self.in_features
        name = self.prefill_kernel if self._prefill_path() else self.kernel_at(rows)
        if name == "dense":
            return self.dense_forward(x, self.bias)
        y = self.run_kernel(name, x.reshape(rows, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def run_kernel(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] -> [rows, out_features] in x's dtype by kernel `name`, its casts
        included, as forward runs it (no bias; the measured choice times exactly this)."""
        return KERNELS[name].run(self, x).to(x.dtype)

    def keep_dense_copy(self, dtype: torch.dtype) -> None:
        """Hold this weight dense (`dense_copy`) for the calls above dense_rows: its own tensor
        (dense_weight's CUDA result is a scratch buffer every layer of the shape shares)."""
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.packed.device)
        self.dense_copy = self.dequantize_into(out)

    def weight_bytes(self) -> int:
        held = (self.packed, self.scale_and_zero, self.bias, self.input_scale)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"dense_rows={self.dense_rows}, input_scale={self.input_scale is not None}, "
                f"dense_copy={self.dense_copy is not None}, kernel={self.kernel}, row_plan={self.row_plan}, "
                f"prefill_kernel={self.prefill_kernel}")


def int4_modules(root: nn.Module) -> list[Int4Linear]:
    """Every Int4Linear under `root` (a model, or a decoder holding fused projections)."""
    return [m for m in root.modules() if isinstance(m, Int4Linear)]

"""Linears that read the same input (q/k/v, gate/up) run as one GEMM where the weight kind allows.

One wider GEMV reads the same bytes as three narrow ones but launches once and keeps more of the
GPU busy: at decode, where every projection is a memory-bound GEMV, that is the difference
between 3.2 and 3.6 TB/s on the H200 (see f67f436:results/h200/decode_profile_*.csv for the unfused
split-K launches).

- nn.Linear: the weights are concatenated once and the original modules' weights become views
  into the fused tensor, so memory does not grow and the HF forward still sees its modules.
- Int4Linear: the int4 codes are repacked as one [sum N, K] matrix (exact: the codes and the
  scale/zero pairs are concatenated, never re-quantized); on CUDA the originals' packed buffers
  become views of the fused one where tinygemm's layout is tile-local (checked, not assumed).
- anything else (bitsandbytes, ...): the modules are called one after another.

Written here because transformers keeps q/k/v and gate/up as separate modules and no library
fuses them in place for an existing model.
"""
from __future__ import annotations

import torch
from torch import nn


def _fuse_dense(linears: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach() for m in linears], dim=0) if has_bias else None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    start = 0
    for m in linears:  # originals become views: one copy of the weights, HF forward unchanged
        n = m.out_features
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if has_bias:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return fused


def _fuse_int4(linears: list) -> nn.Module:
    from bench.quant.int4 import Int4Linear, _pack_nibbles

    first = linears[0]
    device = first.packed.device
    q = torch.cat([m.layout.unpack(m.packed) for m in linears], dim=0)
    sz = torch.cat([m.scale_and_zero for m in linears], dim=1).contiguous()
    has_bias = first.bias is not None
    bias = torch.cat([m.bias for m in linears]) if has_bias else None
    fused = Int4Linear(first.in_features, q.shape[0], first.group_size, _pack_nibbles(q, device), sz, bias,
                       None, first.dense_rows, first.trace_dense)
    if first.dense_copy is not None:  # --int4-prefill-copy: one fused copy, the originals' become views of it
        fused.dense_copy = torch.cat([m.dense_copy for m in linears], dim=0)
        start = 0
        for m in linears:
            m.dense_copy = fused.dense_copy[start:start + m.out_features]
            start += m.out_features
    if device.type == "cuda":  # share the packed codes when the layout is tile-local along N
        start = 0
        for m in linears:
            rows = m.packed.shape[0]
            view = fused.packed[start:start + rows]
            if view.shape == m.packed.shape and torch.equal(view, m.packed):
                m.packed = view
            start += rows
    return fused


def _kind(linears: list) -> str | None:
    from bench.quant.int4 import Int4Linear

    if all(type(m) is nn.Linear for m in linears):
        same = {(m.weight.dtype, m.weight.device, m.in_features, m.bias is None) for m in linears}
        return "dense" if len(same) == 1 else None
    if all(type(m) is Int4Linear for m in linears):
        same = {(m.scale_and_zero.dtype, m.in_features, m.group_size, m.bias is None, m.dense_rows,
                 m.dense_copy is None) for m in linears}
        if len(same) == 1 and all(m.input_scale is None for m in linears) \
                and all(m.out_features % 8 == 0 for m in linears):
            return "int4"
    return None


# Fusion pays where the GEMMs are memory-bound (decode, short suffixes). Above this many rows the
# original modules run: a long prefill is compute-bound either way, and the separate GEMMs are
# the very calls transformers makes, so prefill keys/values stay bit-identical to the hf engine's.
FUSED_MAX_ROWS = 64


class FusedProjections(nn.Module):
    """forward(x) -> one output per original linear, computed by one GEMM where possible."""

    def __init__(self, linears: list[nn.Module], max_rows: int = FUSED_MAX_ROWS):
        super().__init__()
        self.sizes = [m.out_features for m in linears]
        self.max_rows = max_rows
        # (device, dtype) of the activations when the group must reproduce the separate modules'
        # arithmetic: fused only at row counts where that is bit-equal (bit_equal_at); None: free.
        self.exact_check: tuple | None = None
        self._bit_equal: dict[tuple, bool] = {}
        kind = _kind(linears)
        self.kind = kind or "separate"
        self.fused = {"dense": _fuse_dense, "int4": _fuse_int4}[kind](linears) if kind else None
        self.parts = nn.ModuleList(linears)  # views of the fused weights where fused: no extra memory

    def bit_equal_at(self, rows: int, device: torch.device, dtype: torch.dtype, probes: int = 3) -> bool:
        """Whether the fused GEMM gives exactly the separate modules' outputs for `rows` input rows
        of `dtype` (the activations'), checked on `probes` random inputs on `device` (cached per
        row count). Where it does, an engine that must reproduce transformers' arithmetic may fuse
        (`exact_check`). cuBLAS picks its kernel by shape, so the answer depends on the row count:
        a kernel that sums each output in the same order matches on every input; one that splits
        K otherwise (split-K for a narrower N, say) differs on almost any random input. A kernel
        that cannot run the probe counts as not equal (running separately is always exact), as
        does a count first met inside a CUDA-graph capture (no probe there; runs_fused does not
        ask from a compiled trace)."""
        if self.fused is None:
            return False
        key = (rows, str(device), dtype)
        if key not in self._bit_equal:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return False
            gen = torch.Generator(device=device).manual_seed(0)
            same = True
            try:
                with torch.inference_mode():
                    for _ in range(probes):
                        x = torch.randn(1, rows, self.parts[0].in_features, generator=gen, device=device, dtype=dtype)
                        fused = self.fused(x).split(self.sizes, dim=-1)
                        same = same and all(torch.equal(f, m(x)) for f, m in zip(fused, self.parts))
            except (RuntimeError, NotImplementedError):
                same = False
            self._bit_equal[key] = same
        return self._bit_equal[key]

    def exact_fused_rows(self) -> list[int]:
        """Under `exact_check`: the row counts met so far at which the group runs fused, ascending."""
        return sorted(k[0] for k, same in self._bit_equal.items() if same and k[0] <= self.max_rows)

    def runs_fused(self, rows: int) -> bool:
        if self.fused is None or rows > self.max_rows:
            return False
        if self.exact_check is None:
            return True
        if torch.compiler.is_compiling():  # a traced call (exact prefill): separate, as transformers runs
            return False
        return self.bit_equal_at(rows, *self.exact_check)

    def modules_for(self, rows: int) -> list[nn.Module]:
        """The linear modules a call with `rows` input rows runs."""
        return [self.fused] if self.runs_fused(rows) else list(self.parts)

    def forward(self, x: torch.Tensor, streams: list | None = None) -> tuple[torch.Tensor, ...]:
        """One output per original linear. Run separately, with CUDA side `streams` (one per module
        after the first), the modules run side by side: each on its stream, forked from and joined
        back to the current one (a CUDA graph captures them as parallel branches); the same
        kernels on the same input, so the same outputs."""
        if self.runs_fused(x.numel() // x.shape[-1]):
            return self.fused(x).split(self.sizes, dim=-1)
        if not streams or len(streams) < len(self.parts) - 1 or not x.is_cuda:
            return tuple(m(x) for m in self.parts)
        current, side = torch.cuda.current_stream(), streams[:len(self.parts) - 1]
        for stream in side:  # fork every branch before the first GEMM is queued: none waits for it
            stream.wait_stream(current)
        out = [self.parts[0](x)]
        for module, stream in zip(self.parts[1:], side):
            with torch.cuda.stream(stream):
                out.append(module(x))
        for stream in side:
            current.wait_stream(stream)
        return tuple(out)

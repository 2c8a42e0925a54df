"""Transformers' own arithmetic on our decoder (the `graph-exact` engine and its eager twin), so
the logits are bit-identical to the hf engine's: projections fused only where the fused GEMM is
bit-equal to the separate ones, layers split around transformers' own attention function called
over exactly the keys so far with the mask transformers builds (`ExactLayers`), the final norm
over every row, one unpadded row at a time. Nothing else differs from FastDecoder (the same
modules do the rest).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bench.engines import attention_kernels
from bench.errors import VariantUnsupported
from bench.engines.decoder import FastDecoder
from bench.engines.fused_linear import FUSED_MAX_ROWS, FusedProjections
from bench.engines.kv_buffers import KVBuffers


class ExactMask(NamedTuple):
    """An exact layer's attention mask: the boolean one transformers passes its attention call,
    and the additive one SDPA makes of it, rows 16-byte aligned (_additive_aligned) ([1, 1, t,
    end] each)."""
    boolean: torch.Tensor
    additive: torch.Tensor


class ExactDecoder(FastDecoder):
    """FastDecoder doing transformers' arithmetic (see the module docstring). Each projection
    group runs fused at a row count (up to FUSED_MAX_ROWS) only if that is bit-equal to its
    separate modules there on this device (FusedProjections.bit_equal_at, checked the first time
    the count is met), else separately; attention goes through the function transformers' own
    layers call (only 'sdpa' is reproduced), under the `attention` kernels policy
    (bench.engines.attention_kernels). Layers run as ExactLayers' functions."""

    def __init__(self, lm: nn.Module, lm_head: nn.Module, config, blocks: nn.ModuleList | None = None,
                 attention: str = "deterministic"):
        super().__init__(lm, lm_head, config, blocks)
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != "sdpa":
            raise VariantUnsupported(f"exact decoding reproduces transformers' sdpa attention; "
                                     f"this model runs {impl!r}")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        attention_kernels.check(attention)
        self.attention = attention
        self.attention_fn = sdpa_attention_forward
        self._set_fusion_rule()

    @property
    def fusion(self) -> str:
        """e.g. 'qkv:separate,gate_up:dense at 1,19 rows (bit-equal), else separate' (the row
        counts met so far)."""
        b = self.layers[0]
        return f"qkv:{_exact_fusion(b.qkv)},gate_up:{_exact_fusion(b.gate_up)}"

    def _set_fusion_rule(self) -> None:
        """Fused only at row counts checked bit-equal, up to FUSED_MAX_ROWS (steps and suffixes;
        prefill runs separately)."""
        p = self.embed.weight
        for b in self.layers:
            for group in (b.qkv, b.gate_up):
                group.exact_check = (p.device, p.dtype)
                group.max_rows = min(group.max_rows, FUSED_MAX_ROWS)

    def _layer_mask(self, mask: torch.Tensor | None, dtype: torch.dtype):
        """An ExactMask: the boolean one as transformers passes its attention, [t, end] -> [1, 1,
        t, end], and the additive one SDPA makes of it, made once per call."""
        return None if mask is None else ExactMask(mask[None, None], _additive_aligned(mask[None, None], dtype))

    def _row_logits(self, h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """transformers norms every row and then keeps the one (a norm of one row may sum in
        another order than a norm of many)."""
        normed = self.norm(h)
        return self.lm_head(normed[:, -1:] if index is None else normed.index_select(1, index))

    def _padded_rows(self, embeds, kv: KVBuffers, start, end, cols, valid):
        raise ValueError("exact decoding runs one unpadded row")

    def _padded_step(self, embeds, kv: KVBuffers, cols, causal, keys_end):
        raise ValueError("exact decoding runs one unpadded row")

    def _step_causal(self, t: int, keys_end: int, cols: torch.Tensor) -> torch.Tensor | None:
        """The caller passes exactly the tokens there will be after the step as its key_len
        (transformers attends over exactly those): one token attends to every key given, without
        a mask (transformers passes none)."""
        return None if t == 1 else super()._step_causal(t, keys_end, cols)

    def attend_hf(self, block, q, k, v, mask):
        """transformers' attention call of `block`: its sdpa function over exactly `k`/`v`, under
        the engine's attention kernels (`attention`) for this many queries, as the hf engine calls it.
        Returns [b, heads, t, head_dim] like `_sdpa` (a view of transformers' [b, t, heads, d])."""
        with attention_kernels.few_queries(self.attention, q.shape[2]):
            out, _ = self.attention_fn(block.attn, q, k, v, mask, dropout=0.0, scaling=block.attn.scaling)
        return out.transpose(1, 2)

    # The parts of an exact layer between its GEMM groups and attention call (ExactLayers
    # compiles them): one function per use so that each compiles for its own shapes.
    def exact_norm_at(self, norm, h):
        return self._norm(norm, h)

    def exact_rotate_write_at(self, q, k, v, cos, sin, pos, keys, values):
        q, k, v = self._heads_rotated(q, k, v, cos, sin)
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        return q

    def exact_out_norm_at(self, block, h, o):
        h = self._attn_out(block, h, o)
        return h, self._norm(block.ln2, h)

    def exact_mlp_at(self, block, h, gate, up):
        return h + block.down(self._gate(block, gate, up))

    def exact_qkv_from(self, block, h, cos, sin, start: int, keys, values):
        q, k, v = self._qkv(block, h, cos, sin)
        end = start + h.shape[1]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return q, k.contiguous(), v.contiguous()  # as transformers' cache returns them (see ExactLayers)

    def exact_out_from(self, block, h, o):
        return self._out_mlp(block, h, o)


class ExactLayers:
    """Layer functions reproducing transformers' arithmetic (ExactDecoder's): `from_` for
    prefill (host-known start), `at` for step (device positions). A layer is its projections,
    rotary and cache write, then transformers' attention function (`attend_hf`, called eagerly:
    over exactly the keys so far, which changes shape every token), then the output projection
    and MLP. `compile(fn, dynamic)` may compile the parts between GEMM groups and attention (the
    graph engine: eager-exact numerics keep them bit-identical to eager); they stay eager
    without it.

    In `at` (decode steps and suffixes: memory-bound GEMVs) a group of projections that runs
    separately (q/k/v, gate/up where fusing is not bit-equal) runs its GEMMs side by side on the
    `streams` given (FusedProjections.forward): the same kernels on the same inputs, so the same
    bits.

    The attention call (`attend`) reads views of the KV buffers, not the contiguous copies
    transformers' DynamicCache hands it (it concatenates), and a call with a mask gets the
    additive mask SDPA would make of transformers' boolean one, made once per step instead of
    once per layer. Calls of fewer than FEW_QUERIES queries (flash or memory-efficient attention,
    which address keys by their strides) always read views (with the boolean mask). Longer ones
    (cuDNN, which picks a plan for the strides it is given) do so at a shape only once that gave
    bit for bit the output of transformers' own way (contiguous copies, boolean mask) on this
    device (checked the first time the shape is met, outside a CUDA graph capture; until then and
    where it did not, they take transformers' way). On the H200 it did at every suffix shape measured (16-64 queries,
    llava-1.5-7b's and vila1.5-3b's heads), and with the mask's rows aligned took 18-22 us a
    layer where transformers' way took 32-54 (f67f436:results/h200/exact_attention_h200.csv)."""

    def __init__(self, dec: ExactDecoder, compile=None, streams: list | None = None):
        wrap = compile or (lambda fn, dynamic: fn)
        self.dec, self.streams, self.compiled = dec, streams, compile is not None
        self.norm_at, self.rotate_write_at = wrap(dec.exact_norm_at, False), wrap(dec.exact_rotate_write_at, False)
        self.out_norm_at, self.mlp_at = wrap(dec.exact_out_norm_at, False), wrap(dec.exact_mlp_at, False)
        self.qkv_from, self.out_from = wrap(dec.exact_qkv_from, True), wrap(dec.exact_out_from, True)
        # (q shape, keys attended, masked) -> whether views + additive mask give transformers' bits
        self.views_match: dict[tuple, bool] = {}

    def attend(self, block, q, keys, values, end: int, mask: ExactMask | None):
        """transformers' attention call of `block` over the buffers' first `end` columns (see the
        class docstring for how the keys and mask reach it)."""
        k, v = keys[:, :, :end], values[:, :, :end]
        if q.shape[2] < attention_kernels.FEW_QUERIES:
            return self.dec.attend_hf(block, q, k, v, None if mask is None else mask.boolean)
        views = lambda: self.dec.attend_hf(block, q, k, v, None if mask is None else mask.additive)  # noqa: E731
        transformers_way = lambda: self.dec.attend_hf(  # noqa: E731
            block, q, k.contiguous(), v.contiguous(), None if mask is None else mask.boolean)
        key = (tuple(q.shape), end, mask is not None)
        fast = self.views_match.get(key)
        if fast is None and not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
            theirs = transformers_way()
            self.views_match[key] = torch.equal(views(), theirs)
            return theirs
        return views() if fast else transformers_way()

    def at(self, block, h, cos, sin, pos, mask, keys, values, keys_end: int | None = None):
        q, k, v = block.qkv(self.norm_at(block.ln1, h), self.streams)
        q = self.rotate_write_at(q, k, v, cos, sin, pos, keys, values)
        o = self.attend(block, q, keys, values, keys_end or keys.shape[2], mask)
        h, x = self.out_norm_at(block, h, o)
        return self.mlp_at(block, h, *block.gate_up(x, self.streams))

    def from_(self, block, h, cos, sin, start: int, mask, keys, values):
        q, k, v = self.qkv_from(block, h, cos, sin, start, keys, values)  # k, v contiguous, as a fresh cache's
        if mask is None:  # a fresh prompt attends its own k/v, as transformers
            return self.out_from(block, h, self.dec.attend_hf(block, q, k, v, None))
        return self.out_from(block, h, self.attend(block, q, keys, values, start + h.shape[1], mask))

    def describe(self) -> str:
        """How the attention calls of 16+ queries met so far ran, for engine_detail."""
        if not self.views_match:
            return ""
        fast = sorted({k[0][2] for k, ok in self.views_match.items() if ok})
        slow = sorted({k[0][2] for k, ok in self.views_match.items() if not ok})
        parts = [f"views + additive mask at {_row_counts(fast)} queries (bit-equal)"] if fast else []
        parts += [f"contiguous copies + boolean mask at {_row_counts(slow)} queries"] if slow else []
        return "attention of 16+ queries: " + ", ".join(parts)


def _exact_fusion(group: FusedProjections) -> str:
    """'dense at 1,17-19 rows (bit-equal), else separate', or 'separate'."""
    rows = group.exact_fused_rows()
    if not rows:
        return "separate"
    return f"{group.kind} at {_row_counts(rows)} row{'s' if rows != [1] else ''} (bit-equal), else separate"


def _row_counts(rows: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3,7'."""
    spans, start = [], None
    for i, r in enumerate(rows):
        start = r if start is None else start
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            spans.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(spans)


def _additive_aligned(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """_additive(mask), its rows 16-byte aligned (a view of wider storage): the same values at
    another row stride. cuDNN attends with an unaligned mask (keys not a multiple of 8 in fp16)
    much more slowly: 36.4 against 21.5 us a layer for llava-1.5-7b's 19-query warm suffix over
    647 keys on the H200, the same bits (f67f436:results/h200/exact_attention_h200.csv)."""
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    end = mask.shape[-1]
    storage = torch.zeros(*mask.shape[:-1], -(-end // per_16_bytes) * per_16_bytes, dtype=dtype, device=mask.device)
    return storage[..., :end].masked_fill_(~mask, float("-inf"))

"""The static engines' LLM forward: a Llama-family decoder (llama, qwen2) over preallocated KV
buffers, built from the loaded transformers model's own modules.

Why not transformers' forward: per decoder layer it launches ~60 kernels (mask building, rotary
pieces, cache bookkeeping), which bounds both eager prefill and the graph-captured decode step
on the H200 (results/h200/decode_profile_llava-1.5-7b.csv). This forward calls the same modules
for everything numeric (RMSNorm, rotary embedding, activation, projections, lm_head, so weight
variants apply unchanged) and differs only in
- q/k/v and gate/up run as one GEMM each (bench.engines.fused_linear),
- keys/values are written straight into fixed buffers and attended with SDPA,
- two ways to say where a call writes:
  * `prefill(embeds, kv, start)` - host-known start (eager, any length): causal flash attention
    over the new tokens when start == 0, a causal-offset mask over the buffer otherwise;
  * `step(embeds, n_real, kv)` - the write position is the device tensor `kv.length`, so the call
    can be captured in a CUDA graph and replayed: decode (one token) and padded suffix buckets
    (`n_real` of the tokens are real; the padding is written past them and overwritten later).

`exact` (set_exact; the `graph-exact` engine) makes every call do transformers' own arithmetic
instead, so its logits are bit-identical to the hf engine's: projections fused only where the
fused GEMM is bit-equal to the separate ones, layers split around transformers' own attention
function called over exactly the keys so far with the mask transformers builds (`ExactLayers`),
the final norm over every row. Nothing else differs (the same modules do the rest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bench.engines import attention_kernels
from bench.errors import VariantUnsupported
from bench.engines.fused_linear import FUSED_MAX_ROWS, FusedProjections
from bench.engines.row_mean import ordered_row_mean

SUPPORTED_DECODERS = ("llama", "qwen2")
MATMUL_ATTENTION_MAX_T = 32  # compiled steps of up to this many queries attend by matmul (see _matmul_attention)
# How traced (torch.compile'd) layers compute RMSNorm and SiLU-gating (`FastDecoder.numerics`):
#  "fused": the modules as written; inductor fuses them and skips eager's fp16 roundings between ops.
#  "eager-casts": eager's formulas op by op, for inductor's emulate_precision_casts to round where
#    eager does (the compiling engine turns that option on); only the fp32 mean of RMSNorm sums in
#    inductor's order.
#  "eager-exact": also that mean in eager's own summation order (an opaque op, eager_row_mean:
#    ATen's kernel, or on CUDA bench.engines.row_mean's where it matched it): bit-identical to eager, on
#    the CPU and on the H200 (llava-1.5-7b decode
#    layers: 0 of their outputs differ, against 0.92% eager-casts and 48% fused, with
#    deterministic attention kernels: results/h200/compile_numerics_llava-1.5-7b-deterministic.csv;
#    the 0.03% measured earlier with cuDNN attention was that kernel's run-to-run noise).
NUMERICS = ("fused", "eager-casts", "eager-exact")


def inductor_options(numerics: str) -> dict:
    """torch.compile options for layers traced under `numerics`: the eager ones have inductor
    round to fp16 wherever the eager ops would."""
    if numerics == "fused":
        return {}
    # division_rounding: IEEE division as ATen's (Triton's `/` is approximate), which SiLU's
    # x / (1 + exp(-x)) needs to round as eager does; absent from older torch
    from torch._inductor import config as inductor_config

    division = {"eager_numerics.division_rounding": True} if hasattr(
        getattr(inductor_config, "eager_numerics", None), "division_rounding") else {}
    options = {"emulate_precision_casts": True, **division}
    if numerics == "eager-exact":
        # GEMMs exactly as eager calls them: no padding of unaligned sizes or strides (a padded
        # GEMM may run another cuBLAS kernel, which sums in another order)
        options.update({k: False for k in ("shape_padding", "comprehensive_padding") if hasattr(inductor_config, k)})
    return options


@torch.library.custom_op("vlmbench::eager_row_mean", mutates_args=())
def eager_row_mean(x: torch.Tensor) -> torch.Tensor:
    """x.mean(-1, keepdim=True) summed in the order of ATen's reduction kernel (by that kernel, or
    on CUDA where it matched it bit for bit, bench.engines.row_mean's faster one), opaque to
    torch.compile (which would sum in its own order)."""
    return ordered_row_mean(x)


@eager_row_mean.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], 1)


class ExactMask(NamedTuple):
    """An exact layer's attention mask: the boolean one transformers passes its attention call,
    and the additive one SDPA makes of it, rows 16-byte aligned (_additive_aligned) ([1, 1, t,
    end] each)."""
    boolean: torch.Tensor
    additive: torch.Tensor


@dataclass
class KVLayer:
    keys: torch.Tensor  # [batch, kv_heads, max_len, head_dim]
    values: torch.Tensor


class KVBuffers:
    """Every layer's keys/values in one tensor, allocated once; `length` (device) = tokens written.

    One tensor (not one per layer) so that saving or restoring a prefix is a single copy kernel.
    A batch of several rows also keeps which columns are real (`valid`: rows padded to a common
    length have masked gaps) and each row's next position (`next_pos`), both on the device so
    graph replays update them.

    One row's length may be `deferred`: known on the host, not yet written to the device. A warm
    request resets the buffers and finds its prefix already in place, so neither needs a kernel;
    its suffix graph writes the length it starts from itself (with its token ids), and anything
    else that reads or advances the length on the device settles it first (`settle`). Two
    launches less on the host path to the first token (~0.1 ms cold on the H200 machine)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int, device, dtype, batch: int = 1):
        self.data = torch.zeros(layers, 2, batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.layers = [KVLayer(self.data[i, 0], self.data[i, 1]) for i in range(layers)]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.deferred: int | None = None  # the length when the device tensor does not hold it yet
        self.max_len, self.batch = max_len, batch
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device) if batch > 1 else None
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device) if batch > 1 else None

    def reset(self) -> None:
        # Stale keys/values need no zeroing: masks never admit a position before it is written.
        if self.valid is None:
            self.deferred = 0
            return
        self.length.zero_()
        self.valid.zero_()
        self.next_pos.zero_()

    def settle(self) -> None:
        """Write a deferred length to the device (never inside a capture: it would be a constant)."""
        if self.deferred is not None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("a deferred KV length reached a CUDA graph capture")
            self.length.fill_(self.deferred)
            self.deferred = None

    def take_deferred(self) -> int | None:
        """The deferred length, now the caller's to write (a suffix graph does, from its inputs)."""
        n, self.deferred = self.deferred, None
        return n

    def positions(self) -> tuple:
        """Where the next tokens go (copies); `set_positions` rewinds to them. Columns written
        past the rewound length are never attended to (the causal mask stops at the query)."""
        self.settle()
        return self.length.clone(), None if self.next_pos is None else self.next_pos.clone()

    def set_positions(self, saved: tuple) -> None:
        self.deferred = None
        self.length.copy_(saved[0])
        if self.next_pos is not None:
            self.next_pos.copy_(saved[1])

    def save_prefix(self, n: int, row: int = 0) -> torch.Tensor:
        """A copy of one row's first n positions of every layer: [layers, 2, 1, kv_heads, n, head_dim]."""
        return self.data[:, :, row:row + 1, :, :n].clone()

    def load_prefixes(self, entries: list[torch.Tensor], in_place: list[bool] | None = None) -> list[int]:
        """Copy saved prefixes to the front of each row (one kernel when every row shows the same
        prefix); rows of unequal length end in a masked gap. Rows whose `in_place` is True
        already hold their prefix and are not copied. Returns the lengths."""
        lengths = [e.shape[-2] for e in entries]
        n = max(lengths)
        in_place = in_place or [False] * len(entries)
        if all(in_place):
            if self.valid is None:  # nothing to write: the row holds its prefix
                self.deferred = n
                return lengths
        elif all(e is entries[0] for e in entries):
            self.data[..., :n, :].copy_(entries[0])  # broadcast over the batch
        else:
            for b, e in enumerate(entries):
                if not in_place[b]:
                    self.data[:, :, b:b + 1, :, :lengths[b]].copy_(e)
        self.deferred = None
        self.length.fill_(n)
        if self.valid is not None:
            dev = self.valid.device
            self.valid.copy_(torch.arange(self.max_len, device=dev)[None, :]
                             < torch.tensor(lengths, device=dev)[:, None])
            self.next_pos.copy_(torch.tensor(lengths, device=dev))
        return lengths

    def get_seq_length(self) -> int:
        return self.deferred if self.deferred is not None else int(self.length)


class FastDecoder(nn.Module):
    """See the module docstring. Holds references to the model's modules, never copies."""

    def __init__(self, lm: nn.Module, lm_head: nn.Module, config):
        super().__init__()
        if config.model_type not in SUPPORTED_DECODERS:
            raise VariantUnsupported(f"the static engines drive {', '.join(SUPPORTED_DECODERS)} decoders, "
                                     f"not {config.model_type!r}")
        if getattr(config, "use_sliding_window", False):
            raise VariantUnsupported("the static engines do not implement sliding-window attention")
        self.config = config
        self.embed, self.norm, self.rotary, self.lm_head = lm.embed_tokens, lm.norm, lm.rotary_emb, lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.gqa = self.kv_heads != self.heads
        self.numerics = "fused"  # see NUMERICS; a compiling engine may choose another
        # Compiled one-query (decode) steps attend by `_matmul_attention` rather than SDPA: set
        # under deterministic attention kernels (bench.engines.attention_kernels), where cuDNN may not
        # run them and SDPA with a mask would run memory-efficient attention, ~4x slower.
        self.one_query_matmul = False
        self.exact = False  # see set_exact
        self.attention_fn = None  # transformers' attention function (set_exact)
        self.layers = nn.ModuleList()
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            block = nn.Module()
            block.ln1, block.ln2, block.act = layer.input_layernorm, layer.post_attention_layernorm, m.act_fn
            block.qkv = FusedProjections([a.q_proj, a.k_proj, a.v_proj])
            block.o = a.o_proj
            block.gate_up = FusedProjections([m.gate_proj, m.up_proj])
            block.down = m.down_proj
            block.attn = a  # transformers' attention module: what its attention function is called with (exact)
            self.layers.append(block)

    @property
    def fusion(self) -> str:
        """How projections run, e.g. 'qkv:dense,gate_up:dense' (recorded per row); exact:
        'qkv:separate,gate_up:dense at 1,19 rows (bit-equal), else separate' (the row counts met so far)."""
        b = self.layers[0]
        if not self.exact:
            return f"qkv:{b.qkv.kind},gate_up:{b.gate_up.kind}"
        return f"qkv:{_exact_fusion(b.qkv)},gate_up:{_exact_fusion(b.gate_up)}"

    def set_exact(self, on: bool) -> None:
        """Reproduce transformers' arithmetic (see the module docstring) or not. On: each
        projection group runs fused at a row count (up to FUSED_MAX_ROWS) only if that is
        bit-equal to its separate modules there on this device (FusedProjections.bit_equal_at,
        checked the first time the count is met), else separately; attention goes
        through the function transformers' own layers call (only 'sdpa' is reproduced)."""
        self.exact = on
        if not on:
            for b in self.layers:
                b.qkv.exact_check = b.gate_up.exact_check = None
            return
        impl = getattr(self.config, "_attn_implementation", None)
        if impl != "sdpa":
            raise VariantUnsupported(f"exact decoding reproduces transformers' sdpa attention; this model runs {impl!r}")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.attention_fn = sdpa_attention_forward
        p = self.embed.weight
        for b in self.layers:
            for group in (b.qkv, b.gate_up):
                group.exact_check = (p.device, p.dtype)
                group.max_rows = min(group.max_rows, FUSED_MAX_ROWS)  # steps and suffixes; prefill runs separately

    def set_fused_max_rows(self, rows: int) -> None:
        """Above `rows` input rows the projections run unfused (bench.engines.fused_linear.FUSED_MAX_ROWS)."""
        for block in self.layers:
            block.qkv.max_rows = block.gate_up.max_rows = rows

    def prefill_linears(self, rows: int) -> list[list[nn.Module]]:
        """Per layer, the linear modules a prefill of `rows` rows runs (fused or not)."""
        return [[*b.qkv.modules_for(rows), b.o, *b.gate_up.modules_for(rows), b.down] for b in self.layers]

    def new_buffers(self, max_len: int, batch: int = 1) -> KVBuffers:
        p = self.embed.weight
        return KVBuffers(len(self.layers), self.kv_heads, self.head_dim, max_len, p.device, p.dtype, batch)

    # ------------------------------------------------------------------------------------------
    def _traced_eager_numerics(self) -> bool:
        """Whether this call is being traced under one of the eager numerics (see NUMERICS)."""
        return self.numerics != "fused" and torch.compiler.is_compiling()

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`norm(x)`; traced under eager numerics, transformers' RMSNorm written op by op."""
        if not self._traced_eager_numerics() or not hasattr(norm, "variance_epsilon"):
            return norm(x)
        xf = x.to(torch.float32)
        sq = xf * xf  # = pow(2): ATen squares by one multiplication
        variance = eager_row_mean(sq) if self.numerics == "eager-exact" else sq.mean(-1, keepdim=True)
        return norm.weight * (xf * torch.rsqrt(variance + norm.variance_epsilon)).to(x.dtype)

    def _gate(self, block, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up; traced under eager numerics, SiLU as ATen's kernel computes it
        (x / (1 + exp(-x)) in fp32, rounded to the input dtype)."""
        if not self._traced_eager_numerics() or self.config.hidden_act != "silu":
            return block.act(gate) * up
        g = gate.to(torch.float32)
        return (g / (1 + torch.exp(-g))).to(gate.dtype) * up

    def _qkv(self, block, h, cos, sin):
        return self._heads_rotated(*block.qkv(self._norm(block.ln1, h)), cos, sin)

    def _heads_rotated(self, q, k, v, cos, sin):
        """Projection outputs [b, t, n*d] as [b, n, t, d] heads, q and k rotated."""
        b, t, _ = q.shape
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _attn_out(self, block, h, o):
        """The residual stream after attention: h + o_proj(o), o [b, heads, t, d]."""
        b, _, t, _ = o.shape
        return h + block.o(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def _out_mlp(self, block, h, o):
        h = self._attn_out(block, h, o)
        gate, up = block.gate_up(self._norm(block.ln2, h))
        return h + block.down(self._gate(block, gate, up))

    def _sdpa(self, q, k, v, mask=None, causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                              enable_gqa=self.gqa)

    def _matmul_attention(self, q, k, v, mask):
        """Attention in transformers' eager arithmetic (fp16 scores, softmax in fp32), query
        groups of a shared kv head stacked so keys are never repeated. Compiled, it is two
        batched GEMMs, a fused softmax and a copy: in llava-1.5-7b's warm suffix graph on the H200
        (32 queries over 768 keys) they take 0.41 ms over 32 layers where cuDNN SDPA took 0.67 ms
        (the `warm request kernel` rows of results/h200/warm_profile_llava-1.5-7b.csv; the cuDNN
        figure is that file as of commit 26ea28e). Alone (sdpa_backends_h200.csv, `matmul_compiled`) it beats
        cuDNN at 16 queries (9.4 against 21.4 us per layer, 768 keys), about ties at 32 and loses
        at 64 and at one query: only steps of 2-32 queries use it (`MATMUL_ATTENTION_MAX_T`)."""
        b, h, t, d = q.shape
        kvh = k.shape[1]
        qg = q.reshape(b, kvh, (h // kvh) * t, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, h, t, -1) * self.scaling
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p.view(b, kvh, (h // kvh) * t, -1), v).view(b, h, t, d)

    def attend_hf(self, block, q, k, v, mask):
        """transformers' attention call of `block` (exact): its sdpa function over exactly `k`/`v`,
        under the run's attention-kernel choice for this many queries, as the hf engine calls it.
        Returns [b, heads, t, head_dim] like `_sdpa` (a view of transformers' [b, t, heads, d])."""
        with attention_kernels.few_queries(q.shape[2]):
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

    def layer_from(self, block, h, cos, sin, start: int, mask, keys, values):
        """One layer for tokens at host-known positions start..start+t (eager prefill)."""
        q, k, v = self._qkv(block, h, cos, sin)
        end = start + h.shape[1]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        if mask is not None:
            o = self._sdpa(q, keys[:, :, :end], values[:, :, :end], mask=mask)
        else:  # a fresh unpadded prompt attends only to itself: causal (flash) attention, no mask tensor
            o = self._sdpa(q, k, v, causal=h.shape[1] > 1)
        return self._out_mlp(block, h, o)

    def layer_at(self, block, h, cos, sin, pos, mask, keys, values, keys_end: int | None = None):
        """One layer for tokens at device positions `pos` (graph-capturable; what gets compiled),
        attending over the buffers' first `keys_end` columns (default all).
        Compiled, a few queries (the suffix buckets up to 32; one too under `one_query_matmul`)
        attend through `_matmul_attention`."""
        q, k, v = self._qkv(block, h, cos, sin)
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        if keys_end is not None and keys_end != keys.shape[2]:
            keys, values = keys[:, :, :keys_end], values[:, :, :keys_end]
        t = q.shape[2]
        if (1 < t or self.one_query_matmul) and t <= MATMUL_ATTENTION_MAX_T and torch.compiler.is_compiling():
            o = self._matmul_attention(q, keys, values, mask)
        else:
            o = self._sdpa(q, keys, values, mask=mask)
        return self._out_mlp(block, h, o)

    def _layer_mask(self, mask: torch.Tensor | None, dtype: torch.dtype):
        """The boolean mask (True: attend) as the layers take it: exact, an ExactMask (the boolean
        one as transformers passes its attention, [t, end] -> [1, 1, t, end], and the additive one
        SDPA makes of it, made once per call); else the additive one."""
        if self.exact:
            return None if mask is None else ExactMask(mask[None, None], _additive_aligned(mask[None, None], dtype))
        return _additive(mask, dtype)

    def _row_logits(self, h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of row `index` (device [1]; default the last) of the last layer's output.
        Exact: transformers norms every row and then keeps the one (a norm of one row may sum
        in another order than a norm of many)."""
        if self.exact:
            normed = self.norm(h)
            return self.lm_head(normed[:, -1:] if index is None else normed.index_select(1, index))
        return self.lm_head(self.norm(h[:, -1:] if index is None else h.index_select(1, index)))

    def prefill(self, embeds: torch.Tensor, kv: KVBuffers, start: int, layer_fn=None,
                valid: torch.Tensor | None = None, prefetch=None, n_real: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Tokens at host-known columns start.. ; returns the last column's logits [b, 1, vocab].
        `layer_fn` replaces `layer_from` (e.g. a compiled copy). A batch of several rows may pass
        `valid` [b, t] (False: a padding gap, masked out and skipped by the positions).
        `prefetch` (bench.quant.prefetch.DensePrefetch) is told before and after each layer.
        `n_real` (device scalar, one unpadded row from column 0): only the first `n_real` tokens
        are real, the rest pad the call to a fixed length (GraphEngine's captured prefill). Causal
        attention keeps the padding out of the real tokens; its keys/values land past
        `kv.length` = n_real, where nothing attends until a later token overwrites them. The
        logits are the last real token's."""
        layer_fn = layer_fn or self.layer_from
        end = start + embeds.shape[1]
        if end > kv.max_len:
            raise ValueError(f"{end} tokens do not fit the {kv.max_len}-token KV buffers")
        cols = torch.arange(start, end, device=embeds.device)
        if n_real is not None and (start or kv.valid is not None or valid is not None):
            raise ValueError("n_real is for one unpadded row prefilled from column 0")
        if kv.valid is None:  # one row, no gaps: positions are columns
            if valid is not None:
                raise ValueError("padding needs KV buffers made for a batch")
            cos, sin = self.rotary(embeds, cols[None])
            mask = torch.arange(end, device=embeds.device)[None, :] <= cols[:, None] if start else None  # [t, end]
        elif self.exact:
            raise ValueError("exact decoding runs one unpadded row")
        else:
            if valid is None:
                valid = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            kv.valid[:, start:end] = valid
            pos = (kv.next_pos[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)  # [b, t]
            kv.next_pos.add_(valid.sum(1))
            cos, sin = self.rotary(embeds, pos)
            causal = torch.arange(end, device=embeds.device)[None, :] <= cols[:, None]
            mask = (causal[None] & kv.valid[:, None, :end])[:, None]  # [b, 1, t, end]
        mask = self._layer_mask(mask, embeds.dtype)
        h = embeds
        if prefetch is not None:
            prefetch.begin()
        for i, (block, layer) in enumerate(zip(self.layers, kv.layers)):
            if prefetch is not None:
                prefetch.before_layer(i)
            h = layer_fn(block, h, cos, sin, start, mask, layer.keys, layer.values)
            if prefetch is not None:
                prefetch.after_layer(i)
        kv.deferred = None  # (a capture's replays write the length themselves: GraphEngine clears it)
        if n_real is None:
            kv.length.fill_(end)
            return self._row_logits(h)
        kv.length.copy_(n_real)
        return self._row_logits(h, (n_real - 1).reshape(1))

    def step(self, embeds: torch.Tensor, n_real: torch.Tensor, kv: KVBuffers, layer_fn=None,
             key_len: int | None = None) -> torch.Tensor:
        """Tokens written from the device column kv.length (graph-capturable); the first
        `n_real` (device scalar) are real (a batch of several rows: all of them, as in decode).
        Returns logits of the last real token [b, 1, vocab].
        `layer_fn` replaces `layer_at` (GraphEngine passes its compiled copy); it gets the whole
        buffers and the number of columns to attend over.
        `key_len`: attend over the buffers' first `key_len` columns only (the caller knows every
        token written so far lies below it); default all `max_len` of them. Exact: the caller
        passes exactly the tokens there will be after this call (transformers attends over
        exactly those; one token then goes without a mask, as there)."""
        layer_fn = layer_fn or self.layer_at
        keys_end = key_len or kv.max_len
        t = embeds.shape[1]
        kv.settle()
        cols = kv.length + torch.arange(t, device=embeds.device)  # [t]
        # exact: one token attends to every key given, without a mask (transformers passes none)
        causal = None if self.exact and t == 1 else \
            torch.arange(keys_end, device=embeds.device)[None, :] <= cols[:, None]  # [t, keys_end]
        if kv.valid is None:
            cos, sin = self.rotary(embeds, cols[None])
            mask = causal
        elif self.exact:
            raise ValueError("exact decoding runs one unpadded row")
        else:  # a batch: every row's tokens are real here (decode); positions skip each row's gaps
            kv.valid.index_fill_(1, cols, True)
            cos, sin = self.rotary(embeds, kv.next_pos[:, None] + torch.arange(t, device=embeds.device))
            mask = (causal[None] & kv.valid[:, None, :keys_end])[:, None]  # [b, 1, t, keys_end]
        mask = self._layer_mask(mask, embeds.dtype)
        h = embeds
        for block, layer in zip(self.layers, kv.layers):
            h = layer_fn(block, h, cos, sin, cols, mask, layer.keys, layer.values, keys_end)
        index = (n_real - 1).reshape(1)
        kv.length.add_(n_real)
        if kv.next_pos is not None:
            kv.next_pos.add_(n_real)
        return self._row_logits(h, index)


class ExactLayers:
    """Layer functions reproducing transformers' arithmetic (FastDecoder.exact): `from_` for
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
    layer where transformers' way took 32-54 (results/h200/exact_attention_h200.csv)."""

    def __init__(self, dec: FastDecoder, compile=None, streams: list | None = None):
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


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: attend) as the additive one SDPA turns it into, made once
    per call instead of once per layer (32 fewer kernels in every captured step)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _additive_aligned(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """_additive(mask), its rows 16-byte aligned (a view of wider storage): the same values at
    another row stride. cuDNN attends with an unaligned mask (keys not a multiple of 8 in fp16)
    much more slowly: 36.4 against 21.5 us a layer for llava-1.5-7b's 19-query warm suffix over
    647 keys on the H200, the same bits (results/h200/exact_attention_h200.csv)."""
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    end = mask.shape[-1]
    storage = torch.zeros(*mask.shape[:-1], -(-end // per_16_bytes) * per_16_bytes, dtype=dtype, device=mask.device)
    return storage[..., :end].masked_fill_(~mask, float("-inf"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (cos/sin [b, t, d] -> [b, 1, t, d])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def fast_decoder(adapter) -> FastDecoder:
    """The adapter's FastDecoder, built once (fusing rebinds weights; doing it twice would not)."""
    dec = adapter.__dict__.get("_fast_decoder")
    if dec is None:
        lm, head = adapter.decoder_parts()
        dec = FastDecoder(lm, head, adapter.text_config())
        adapter._fast_decoder = dec
    return dec

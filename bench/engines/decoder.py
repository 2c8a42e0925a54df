"""The static engines' LLM forward: a Llama-family decoder (llama, qwen2) over preallocated KV
buffers, built from the loaded transformers model's own modules.

Why not transformers' forward: per decoder layer it launches ~60 kernels (mask building, rotary
pieces, cache bookkeeping), which bounds both eager prefill and the graph-captured decode step
on the H200 (f67f436:results/h200/decode_profile_llava-1.5-7b.csv). This forward calls the same modules
for everything numeric (RMSNorm, rotary embedding, activation, projections, lm_head, so weight
variants apply unchanged) and differs only in
- q/k/v and gate/up run as one GEMM each (bench.engines.fused_linear),
- keys/values are written straight into fixed buffers and attended with SDPA (compiled one-query
  steps: bench.engines.split_kv_attention's kernels, which also rotate the query and, in the graph
  engine's step layer, write the new key and value, or matmul),
- two ways to say where a call writes:
  * `prefill(embeds, kv, start)` - host-known start (eager, any length): causal flash attention
    over the new tokens when start == 0, a causal-offset mask over the buffer otherwise;
  * `step(embeds, n_real, kv)` - the write position is the device tensor `kv.length`, so the call
    can be captured in a CUDA graph and replayed: decode (one token) and padded suffix buckets
    (`n_real` of the tokens are real; the padding is written past them and overwritten later).

A subclass may do transformers' own arithmetic instead (ExactDecoder, the `graph-exact`
engine's): it overrides the hooks that say how projections fuse, how a call's mask is made and
handed to the layers, how a batch of padded rows is taken and how the last row's logits are
computed.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import VariantUnsupported
from bench.engines import split_kv_attention
from bench.engines.fused_linear import FusedProjections
from bench.engines.kv_buffers import KVBuffers
from bench.engines.row_mean import ordered_row_mean

SUPPORTED_DECODERS = ("llama", "qwen2")
MATMUL_ATTENTION_MAX_T = 32  # compiled steps of up to this many queries attend by matmul (see _matmul_attention)


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


class FastDecoder(nn.Module):
    """See the module docstring. Holds references to the model's modules, never copies."""

    def __init__(self, lm: nn.Module, lm_head: nn.Module, config, blocks: nn.ModuleList | None = None):
        """`blocks`: the layers another decoder of the same model built (shared, not rebuilt:
        fusing rebinds weights; doing it twice would not)."""
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
        self.numerics = "fused"  # see bench.engines.spec.NUMERICS; a compiling engine may choose another
        # Compiled one-query (decode) steps attend by `_matmul_attention` rather than SDPA: set
        # under deterministic attention kernels (bench.engines.attention_kernels), where cuDNN may not
        # run them and SDPA with a mask would run memory-efficient attention, ~4x slower.
        self.one_query_matmul = False
        # Compiled one-query steps attend by bench.engines.split_kv_attention instead (the spec's
        # decode_attention "split-kv"; the graph engines set it).
        self.split_kv = False
        # layer_at_folded's MLP input SiLU(gate) * up made in the fused gate/up projection's launch where
        # its kernel can (_gated); off: by a kernel of its own (lab/gpu_step_ab.py --ab fold-gate).
        self.fold_gate = True
        self.layers = blocks if blocks is not None else self._blocks(lm)

    @staticmethod
    def _blocks(lm: nn.Module) -> nn.ModuleList:
        """Per decoder layer, its modules with q/k/v and gate/up grouped (FusedProjections)."""
        blocks = nn.ModuleList()
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            block = nn.Module()
            block.ln1, block.ln2, block.act = layer.input_layernorm, layer.post_attention_layernorm, m.act_fn
            block.qkv = FusedProjections([a.q_proj, a.k_proj, a.v_proj])
            block.o = a.o_proj
            block.gate_up = FusedProjections([m.gate_proj, m.up_proj])
            block.down = m.down_proj
            block.attn = a  # transformers' attention module: what its attention function is called with
            blocks.append(block)
        return blocks

    @property
    def fusion(self) -> str:
        """How projections run, e.g. 'qkv:dense,gate_up:dense' (recorded per row)."""
        b = self.layers[0]
        return f"qkv:{b.qkv.kind},gate_up:{b.gate_up.kind}"

    def set_fused_max_rows(self, rows: int) -> None:
        """Above `rows` input rows the projections run unfused (bench.engines.fused_linear.FUSED_MAX_ROWS),
        under this decoder's fusion rule (`_set_fusion_rule`). The blocks may be shared by several
        decoders of one model: an engine sets both when it is made."""
        for block in self.layers:
            block.qkv.max_rows = block.gate_up.max_rows = rows
        self._set_fusion_rule()

    def _set_fusion_rule(self) -> None:
        """Every projection group fused at every row count up to its max_rows."""
        for b in self.layers:
            b.qkv.exact_check = b.gate_up.exact_check = None

    def prefill_linears(self, rows: int) -> list[list[nn.Module]]:
        """Per layer, the linear modules a prefill of `rows` rows runs (fused or not)."""
        return [[*b.qkv.modules_for(rows), b.o, *b.gate_up.modules_for(rows), b.down] for b in self.layers]

    def new_buffers(self, max_len: int, batch: int = 1) -> KVBuffers:
        p = self.embed.weight
        return KVBuffers(len(self.layers), self.kv_heads, self.head_dim, max_len, p.device, p.dtype, batch)

    # ------------------------------------------------------------------------------------------
    def _traced_eager_numerics(self) -> bool:
        """Whether this call is being traced under one of the eager numerics (bench.engines.spec.NUMERICS)."""
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

    def _qkv(self, block, h, cos, sin, rotate_q: bool = True, rotate_k: bool = True, normed=None):
        """q, k, v heads of layer input h (`normed`: its first RMSNorm's output, made already)."""
        x = self._norm(block.ln1, h) if normed is None else normed
        return self._heads_rotated(*block.qkv(x), cos, sin, rotate_q, rotate_k)

    def _heads_rotated(self, q, k, v, cos, sin, rotate_q: bool = True, rotate_k: bool = True):
        """Projection outputs [b, t, n*d] as [b, n, t, d] heads, (rotate_q) q and (rotate_k) k rotated."""
        b, t, _ = q.shape
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(q, cos, sin) if rotate_q else q, _rotate(k, cos, sin) if rotate_k else k, v

    def _attn_out(self, block, h, o):
        """The residual stream after attention: h + o_proj(o), o [b, heads, t, d]."""
        return h + block.o(self._merged_heads(o))

    def _merged_heads(self, o):
        """Attention output heads [b, heads, t, d] as o_proj takes them: [b, t, heads * d]."""
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)

    def _out_mlp(self, block, h, o):
        h = self._attn_out(block, h, o)
        return h + self._mlp(block, h)

    def _mlp(self, block, h):
        """The MLP's output for the residual stream h (before it is added to h)."""
        gate, up = block.gate_up(self._norm(block.ln2, h))
        return block.down(self._gate(block, gate, up))

    def _sdpa(self, q, k, v, mask=None, causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                              enable_gqa=self.gqa)

    def _matmul_attention(self, q, k, v, mask):
        """Attention in transformers' eager arithmetic (fp16 scores, softmax in fp32), query
        groups of a shared kv head stacked so keys are never repeated. Compiled, it is two
        batched GEMMs, a fused softmax and a copy: in llava-1.5-7b's warm suffix graph on the H200
        (32 queries over 768 keys) they take 0.41 ms over 32 layers where cuDNN SDPA took 0.67 ms
        (the `warm request kernel` rows of f67f436:results/h200/warm_profile_llava-1.5-7b.csv; the cuDNN
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
        """One layer for tokens at device positions `pos` (graph-capturable; what the graph
        engines compile, as `layer_at_deferred`), attending over the buffers' first `keys_end`
        columns (default all).
        Compiled, a few queries (the suffix buckets up to 32; one too under `one_query_matmul`)
        attend through `_matmul_attention`, one through the split-KV kernels under `split_kv`."""
        return self._out_mlp(block, h, self._attend_at(block, h, cos, sin, pos, mask, keys, values, keys_end))

    def layer_at_deferred(self, block, h, pending, cos, sin, pos, mask, pair, keys_end: int | None = None):
        """`layer_at` as the graph engine compiles it (called through `deferring`), written to
        launch two kernels a layer fewer in a captured step (and two more a step: the first
        layer's zeros, the last layer's add; lab/gpu_step_ab.py --ab deferred-residual times it
        against layer_at):
        - the residual add of each layer's MLP output is deferred to the next layer: the layer's
          input is h + pending (the layer before's MLP output; zeros for the first), and it returns
          (its residual stream after attention, its MLP output). The same additions in the same
          order, but compiled one layer at a time, the add lands in the next layer's first RMSNorm
          kernel instead of a kernel of its own. Under the eager numerics (eager-casts, eager-exact)
          the sum is rounded to fp16 there as before, so the outputs are layer_at's bit for bit;
          "fused" lets that norm read it unrounded;
        - keys and values come as one tensor, `pair` [2, b, kv_heads, L, d] (KVLayer.pair), written
          by one index_copy_: as two views of one buffer, each written in turn, they were two kernels;
          in a compiled one-query step attending by split-KV they are written by its kernel
          (split_kv_attention.Config.write_kv: no kernel of their own)."""
        h = h + pending
        o = self._attend_at(block, h, cos, sin, pos, mask, pair[0], pair[1], keys_end, pair)
        h = self._attn_out(block, h, o)
        return h, self._mlp(block, h)

    def layer_at_folded(self, block, h, x, next_norm, cos, sin, pos, mask, pair, keys_end: int | None = None):
        """`layer_at_deferred` as the graph engine compiles it under the spec's fold_norms (called
        through `folding`): each RMSNorm made with the residual add before it, at the end of the
        layer before instead of the start of its own. It takes the layer's input h and its first
        norm's output x (None: made here, the first layer) and returns (its output h, `next_norm`(h):
        the next layer's first norm, or after the last layer the model's final norm; None where
        `next_norm` is: the last layer of a step of several rows, whose logits then read one row
        normalized as `_row_logits` does). Where the o_proj and down_proj run an int4 kernel that
        can (Int4Linear.add_norm_kernel: triton-f16x2 at one row), each adds its output to h and
        normalizes the sum in its own launch (bench.quant.triton_f16x2._add_norm): two kernels a
        layer fewer than layer_at_deferred's step; and where the fused gate/up projection's can
        (_gated), it makes the MLP's SiLU(gate) * up in its launch: one fewer again. Elsewhere the
        same additions and norms as layer_at in the same order, the add fused into the norm's kernel
        when compiled."""
        if x is None:
            x = self._norm(block.ln1, h)
        o = self._attend_at(block, h, cos, sin, pos, mask, pair[0], pair[1], keys_end, pair, normed=x)
        h, x = self._add_norm(block.o, self._merged_heads(o), h, block.ln2)
        return self._add_norm(block.down, self._gated(block, x), h, next_norm)

    def _gated(self, block, x: torch.Tensor) -> torch.Tensor:
        """The MLP's SiLU(gate) * up of its input x: in one launch of the fused gate/up projection's
        kernel where it can (fold_gate; compiled, one row, float16, SiLU, two halves, numerics other
        than eager-exact: Int4Linear.gate_kernel, triton-f16x2's _gated, rounding as _gate does),
        else as _gate after the projection."""
        rows = x.numel() // x.shape[-1]
        pair = block.gate_up
        halves = len(pair.sizes) == 2 and pair.sizes[0] == pair.sizes[1]
        fused = pair.fused if halves and pair.runs_fused(rows) else None
        kernel = self._epilogue_kernel(fused, "gate_kernel", x, self.fold_gate and self.config.hidden_act == "silu")
        if kernel is not None:
            return kernel.run_gated(fused, x.reshape(1, -1)).view(*x.shape[:-1], -1)
        gate, up = pair(x)
        return self._gate(block, gate, up)

    def _epilogue_kernel(self, module, offer: str, x: torch.Tensor, ok: bool):
        """The kernel `module`'s `offer` (Int4Linear.add_norm_kernel or gate_kernel) names for x's rows
        where it may do the work after the projection in its launch: a traced (compiled) call of
        float16 x under numerics other than eager-exact, and `ok` (the caller's own conditions); else
        None."""
        find = getattr(module, offer, None)
        if (find is None or not ok or x.dtype != torch.float16 or not torch.compiler.is_compiling()
                or self.numerics == "eager-exact"):
            return None
        return find(x.numel() // x.shape[-1])

    def _add_norm(self, linear: nn.Module, x: torch.Tensor, h: torch.Tensor, norm: nn.Module | None):
        """(h + linear(x), norm(h + linear(x))): in one launch of the linear's kernel where it can
        (compiled, one row, float16, an RMSNorm, numerics other than eager-exact, whose mean the
        kernel would sum in another order), else as two steps; (h + linear(x), None) without a norm."""
        if norm is None:
            return h + linear(x), None
        kernel = self._epilogue_kernel(linear, "add_norm_kernel", x,
                                       hasattr(norm, "variance_epsilon") and x.dtype == h.dtype == norm.weight.dtype)
        if kernel is not None:
            out, normed = kernel.run_add_norm(linear, x.reshape(1, -1), h.reshape(1, -1), norm)
            return out.view(h.shape), normed.view(h.shape)
        h = h + linear(x)
        return h, self._norm(norm, h)

    def _attends_by_split_kv(self, h) -> bool:
        """Whether `_attend_at` of layer input `h` attends by split-KV attention: one query, traced
        by torch.compile, `split_kv` on."""
        return h.shape[1] == 1 and self.split_kv and torch.compiler.is_compiling()

    def _attend_at(self, block, h, cos, sin, pos, mask, keys, values, keys_end: int | None, pair=None, normed=None):
        """`layer_at`'s attention output [b, heads, t, d] (its new keys and values written; by one
        write into `pair` where given, whose [0] and [1] are keys and values, or, compiled one-query
        steps attending by split-KV with `pair`, by the attention kernel: Config.write_kv).
        `normed`: h's first RMSNorm, made already (layer_at_folded)."""
        split_kv = self._attends_by_split_kv(h)
        # the query handed over unrotated, with cos and sin, and rotated by the attention kernel
        # (split_kv_attention.Config.rotary), rounding as the numerics do
        rotary = split_kv and split_kv_attention.DEFAULT.rotary
        # the new key and value written by the attention kernel (Config.write_kv), the key rotated there too
        writing = split_kv and pair is not None and split_kv_attention.DEFAULT.write_kv
        q, k, v = self._qkv(block, h, cos, sin, rotate_q=not rotary, rotate_k=not (writing and rotary), normed=normed)
        rope = (cos, sin, self.numerics != "fused") if rotary else ()
        if writing:
            # a 2-D mask here is `step`'s for one row's buffers (kv.valid None), every column up to the new one: the
            # kernel may make it from the column (split_kv_attention.Config.causal_mask)
            causal = split_kv_attention.DEFAULT.causal_mask and isinstance(mask, torch.Tensor) and mask.dim() == 2
            return torch.ops.vlmbench.split_kv_attention_writing(
                q, k, v, pos, pair, keys_end or pair.shape[3], None if causal else mask, self.scaling, *rope,
                causal=causal)
        if pair is not None:
            pair.index_copy_(3, pos, torch.stack((k, v)))
        else:
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
        if keys_end is not None and keys_end != keys.shape[2]:
            keys, values = keys[:, :, :keys_end], values[:, :, :keys_end]
        t = q.shape[2]
        if split_kv:
            o = torch.ops.vlmbench.split_kv_attention(q, keys, values, mask, self.scaling, *rope)
        elif (1 < t or self.one_query_matmul) and t <= MATMUL_ATTENTION_MAX_T and torch.compiler.is_compiling():
            o = self._matmul_attention(q, keys, values, mask)
        else:
            o = self._sdpa(q, keys, values, mask=mask)
        return o

    def _layer_mask(self, mask: torch.Tensor | None, dtype: torch.dtype):
        """The boolean mask (True: attend) as the layers take it: the additive one."""
        return _additive(mask, dtype)

    def _row_logits(self, h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of row `index` (device [1]; default the last) of the last layer's output."""
        return self.lm_head(self.norm(h[:, -1:] if index is None else h.index_select(1, index)))

    def _padded_rows(self, embeds: torch.Tensor, kv: KVBuffers, start: int, end: int, cols: torch.Tensor,
                     valid: torch.Tensor | None):
        """(cos, sin, boolean mask [b, 1, t, end]) of a prefill into buffers made for a batch:
        `valid` [b, t] (default all True) says which new tokens are real; positions skip each
        row's gaps."""
        if valid is None:
            valid = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        kv.valid[:, start:end] = valid
        pos = (kv.next_pos[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)  # [b, t]
        kv.next_pos.add_(valid.sum(1))
        cos, sin = self.rotary(embeds, pos)
        causal = torch.arange(end, device=embeds.device)[None, :] <= cols[:, None]
        return cos, sin, (causal[None] & kv.valid[:, None, :end])[:, None]  # [b, 1, t, end]

    def _step_causal(self, t: int, keys_end: int, cols: torch.Tensor) -> torch.Tensor | None:
        """A step's causal mask [t, keys_end] over the buffers' columns (True: attend)."""
        return torch.arange(keys_end, device=cols.device)[None, :] <= cols[:, None]

    def _padded_step(self, embeds: torch.Tensor, kv: KVBuffers, cols: torch.Tensor, causal: torch.Tensor,
                     keys_end: int):
        """(cos, sin, boolean mask [b, 1, t, keys_end]) of a step on buffers made for a batch:
        every row's tokens are real here (decode); positions skip each row's gaps."""
        t = embeds.shape[1]
        kv.valid.index_fill_(1, cols, True)
        cos, sin = self.rotary(embeds, kv.next_pos[:, None] + torch.arange(t, device=embeds.device))
        return cos, sin, (causal[None] & kv.valid[:, None, :keys_end])[:, None]  # [b, 1, t, keys_end]

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
        else:
            cos, sin, mask = self._padded_rows(embeds, kv, start, end, cols, valid)
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
        `layer_fn` replaces `layer_at`; it gets the whole buffers and the number of columns to
        attend over; one made by `deferring` (GraphEngine's compiled layer_at_deferred) takes and
        returns each layer's MLP output for the next to add, one made by `folding`
        (layer_at_folded) each layer's first norm, the last layer's the final norm.
        `key_len`: attend over the buffers' first `key_len` columns only (the caller knows every
        token written so far lies below it); default all `max_len` of them."""
        layer_fn = layer_fn or self.layer_at
        deferred = getattr(layer_fn, "defers_residual", False)
        folded = getattr(layer_fn, "folds_norms", False)
        keys_end = key_len or kv.max_len
        t = embeds.shape[1]
        kv.settle()
        cols = kv.length + torch.arange(t, device=embeds.device)  # [t]
        causal = self._step_causal(t, keys_end, cols)  # [t, keys_end]
        if kv.valid is None:
            cos, sin = self.rotary(embeds, cols[None])
            mask = causal
        else:  # a batch
            cos, sin, mask = self._padded_step(embeds, kv, cols, causal, keys_end)
        mask = self._layer_mask(mask, embeds.dtype)
        h = embeds
        normed = None  # the final norm's output (folded)
        if folded:
            # the final norm with the last layer's add for one row; a step of several rows normalizes the
            # rows its logits read afterwards (_row_logits), as the other layer functions' steps do
            last = self.norm if embeds.shape[0] * t == 1 else None
            for block, layer, after in zip(self.layers, kv.layers, [b.ln1 for b in self.layers[1:]] + [last]):
                h, normed = layer_fn(block, h, normed, after, cos, sin, cols, mask, layer.pair, keys_end)
        elif deferred:
            pending = torch.zeros_like(embeds)
            for block, layer in zip(self.layers, kv.layers):
                h, pending = layer_fn(block, h, pending, cos, sin, cols, mask, layer.pair, keys_end)
            h = h + pending
        else:
            for block, layer in zip(self.layers, kv.layers):
                h = layer_fn(block, h, cos, sin, cols, mask, layer.keys, layer.values, keys_end)
        index = (n_real - 1).reshape(1)
        kv.length.add_(n_real)
        if kv.next_pos is not None:
            kv.next_pos.add_(n_real)
        if normed is not None:
            return self.lm_head(normed.index_select(1, index))
        return self._row_logits(h, index)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: attend) as the additive one SDPA turns it into, made once
    per call instead of once per layer (32 fewer kernels in every captured step)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (cos/sin [b, t, d] -> [b, 1, t, d])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def deferring(layer_fn):
    """`layer_fn` (FastDecoder.layer_at_deferred, compiled or not) as FastDecoder.step calls it:
    marked as taking and returning each layer's MLP output (a function of its own, so the mark
    goes wherever the function goes and nothing else carries it)."""
    def layer(*args, **kwargs):
        return layer_fn(*args, **kwargs)

    layer.defers_residual = True
    return layer


def folding(layer_fn):
    """`layer_fn` (FastDecoder.layer_at_folded, compiled or not) as FastDecoder.step calls it:
    marked as taking each layer's first norm and returning the next one's (as `deferring`)."""
    def layer(*args, **kwargs):
        return layer_fn(*args, **kwargs)

    layer.folds_norms = True
    return layer


# The decoder built over each loaded model's modules (weak: it goes with its model).
_BUILT: "weakref.WeakKeyDictionary[object, FastDecoder]" = weakref.WeakKeyDictionary()


def built_decoder(adapter) -> FastDecoder | None:
    """The adapter's FastDecoder if an engine built one (its fused projections live there, outside
    the model), else None."""
    return _BUILT.get(adapter)


def fast_decoder(adapter, cls: type[FastDecoder] | None = None, **options) -> FastDecoder:
    """The adapter's FastDecoder, built once (fusing rebinds weights; doing it twice would not).
    `cls`: a new decoder of that subclass of FastDecoder over the same blocks (`options`: its
    own constructor arguments)."""
    dec = _BUILT.get(adapter)
    if dec is None:
        lm, head = adapter.decoder_parts()
        dec = _BUILT[adapter] = FastDecoder(lm, head, adapter.text_config())
    if cls is None or cls is FastDecoder:
        return dec
    lm, head = adapter.decoder_parts()
    return cls(lm, head, adapter.text_config(), dec.layers, **options)

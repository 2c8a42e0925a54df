"""The static engines' LLM forward: a Llama-family decoder (llama, qwen2) over preallocated KV
buffers, built from the loaded transformers model's own modules.

Why not transformers' forward: per decoder layer it launches ~60 kernels (mask building, rotary
pieces, cache bookkeeping), which bounds both eager prefill and the graph-captured decode step
on the H200 (results/h200/decode_profile_llava-1.5-7b.csv). This forward calls the same modules
for everything numeric (RMSNorm, rotary embedding, activation, projections, lm_head, so weight
variants apply unchanged) and differs only in
- q/k/v and gate/up run as one GEMM each (bench.fused_linear),
- keys/values are written straight into fixed buffers and attended with SDPA,
- two ways to say where a call writes:
  * `prefill(embeds, kv, start)` - host-known start (eager, any length): causal flash attention
    over the new tokens when start == 0, a causal-offset mask over the buffer otherwise;
  * `step(embeds, n_real, kv)` - the write position is the device tensor `kv.length`, so the call
    can be captured in a CUDA graph and replayed: decode (one token) and padded suffix buckets
    (`n_real` of the tokens are real; the padding is written past them and overwritten later).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import VariantUnsupported
from bench.fused_linear import FusedProjections

SUPPORTED_DECODERS = ("llama", "qwen2")


@dataclass
class KVLayer:
    keys: torch.Tensor  # [batch, kv_heads, max_len, head_dim]
    values: torch.Tensor


class KVBuffers:
    """Every layer's keys/values in one tensor, allocated once; `length` (device) = tokens written.

    One tensor (not one per layer) so that saving or restoring a prefix is a single copy kernel."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int, device, dtype, batch: int = 1):
        self.data = torch.zeros(layers, 2, batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.layers = [KVLayer(self.data[i, 0], self.data[i, 1]) for i in range(layers)]
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len

    def reset(self) -> None:
        # Stale keys/values need no zeroing: masks never admit a position before it is written.
        self.length.zero_()

    def save_prefix(self, n: int) -> torch.Tensor:
        """A copy of the first n positions of every layer: [layers, 2, batch, kv_heads, n, head_dim]."""
        return self.data[..., :n, :].clone()

    def load_prefix(self, entry: torch.Tensor) -> int:
        """Copy a saved prefix back to the front (one kernel); returns its length."""
        n = entry.shape[-2]
        self.data[..., :n, :].copy_(entry)
        self.length.fill_(n)
        return n

    def get_seq_length(self) -> int:
        return int(self.length)


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
        self.layers = nn.ModuleList()
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            block = nn.Module()
            block.ln1, block.ln2, block.act = layer.input_layernorm, layer.post_attention_layernorm, m.act_fn
            block.qkv = FusedProjections([a.q_proj, a.k_proj, a.v_proj])
            block.o = a.o_proj
            block.gate_up = FusedProjections([m.gate_proj, m.up_proj])
            block.down = m.down_proj
            self.layers.append(block)

    @property
    def fusion(self) -> str:
        """How projections run, e.g. 'qkv:dense,gate_up:dense' (recorded per row)."""
        b = self.layers[0]
        return f"qkv:{b.qkv.kind},gate_up:{b.gate_up.kind}"

    def set_fused_max_rows(self, rows: int) -> None:
        """Above `rows` input rows the projections run unfused (bench.fused_linear.FUSED_MAX_ROWS)."""
        for block in self.layers:
            block.qkv.max_rows = block.gate_up.max_rows = rows

    def new_buffers(self, max_len: int, batch: int = 1) -> KVBuffers:
        p = self.embed.weight
        return KVBuffers(len(self.layers), self.kv_heads, self.head_dim, max_len, p.device, p.dtype, batch)

    # ------------------------------------------------------------------------------------------
    def _qkv(self, block, h, cos, sin):
        b, t, _ = h.shape
        q, k, v = block.qkv(block.ln1(h))
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _out_mlp(self, block, h, o):
        b, _, t, _ = o.shape
        h = h + block.o(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        gate, up = block.gate_up(block.ln2(h))
        return h + block.down(block.act(gate) * up)

    def _sdpa(self, q, k, v, mask=None, causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                              enable_gqa=self.gqa)

    def layer_from(self, block, h, cos, sin, start: int, mask, keys, values):
        """One layer for tokens at host-known positions start..start+t (eager prefill)."""
        q, k, v = self._qkv(block, h, cos, sin)
        end = start + h.shape[1]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        if start:
            o = self._sdpa(q, keys[:, :, :end], values[:, :, :end], mask=mask)
        else:  # a fresh prompt attends only to itself: causal (flash) attention, no mask tensor
            o = self._sdpa(q, k, v, causal=h.shape[1] > 1)
        return self._out_mlp(block, h, o)

    def layer_at(self, block, h, cos, sin, pos, mask, keys, values):
        """One layer for tokens at device positions `pos` (graph-capturable; what gets compiled)."""
        q, k, v = self._qkv(block, h, cos, sin)
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        return self._out_mlp(block, h, self._sdpa(q, keys, values, mask=mask))

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_last))

    def prefill(self, embeds: torch.Tensor, kv: KVBuffers, start: int, layer_fn=None) -> torch.Tensor:
        """Tokens at host-known positions start.. ; returns the last position's logits [b, 1, vocab].
        `layer_fn` replaces `layer_from` (e.g. a compiled copy)."""
        layer_fn = layer_fn or self.layer_from
        end = start + embeds.shape[1]
        if end > kv.max_len:
            raise ValueError(f"{end} tokens do not fit the {kv.max_len}-token KV buffers")
        pos = torch.arange(start, end, device=embeds.device)
        cos, sin = self.rotary(embeds, pos[None])
        mask = torch.arange(end, device=embeds.device)[None, :] <= pos[:, None] if start else None  # [t, end]
        h = embeds
        for block, layer in zip(self.layers, kv.layers):
            h = layer_fn(block, h, cos, sin, start, mask, layer.keys, layer.values)
        kv.length.fill_(end)
        return self._logits(h[:, -1:])

    def step(self, embeds: torch.Tensor, n_real: torch.Tensor, kv: KVBuffers, layer_fn=None) -> torch.Tensor:
        """Tokens written from the device position kv.length (graph-capturable); the first
        `n_real` (device scalar) are real. Returns logits of the last real token [b, 1, vocab].
        `layer_fn` replaces `layer_at` (GraphEngine passes its compiled copy)."""
        layer_fn = layer_fn or self.layer_at
        pos = kv.length + torch.arange(embeds.shape[1], device=embeds.device)  # [t]
        cos, sin = self.rotary(embeds, pos[None])
        mask = torch.arange(kv.max_len, device=embeds.device)[None, :] <= pos[:, None]  # [t, max_len]
        h = embeds
        for block, layer in zip(self.layers, kv.layers):
            h = layer_fn(block, h, cos, sin, pos, mask, layer.keys, layer.values)
        last = h.index_select(1, (n_real - 1).reshape(1))
        kv.length.add_(n_real)
        return self._logits(last)


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

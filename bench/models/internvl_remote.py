"""InternVL's remote-code checkpoint layout (config.json `architectures: ["InternVLChatModel"]`, an
InternViT `vision_model`, an `mlp1` projector and an InternLM2 `language_model`, as InternVL2.5 and
InternVideo2.5 publish it) mapped onto transformers' InternVLForConditionalGeneration with a Llama
language model, and back. Only configs and tensor names are read: no code of the checkpoint runs.

InternLM2 is Llama with other names and a packed attention projection: `wqkv` holds, for each of
the num_key_value_heads groups, the group's query heads (num_heads / num_kv_heads of them), then its
key head, then its value head, each head_dim rows (modeling_internlm2's
`rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + groups)`). `w1`/`w3`/`w2` are gate/up/down,
`attention_norm`/`ffn_norm` the two RMSNorms. InternViT's `attn.qkv` is q, k and v stacked.
"""
from __future__ import annotations

import re

import torch

ARCHITECTURE = "InternVLChatModel"
ROPE_TYPES = ("dynamic", "linear")

# (remote name, native name) patterns, each a full-name regex; qkv tensors are split separately.
_NAMES = [
    (r"language_model\.model\.tok_embeddings\.weight", r"model.language_model.embed_tokens.weight"),
    (r"language_model\.model\.norm\.weight", r"model.language_model.norm.weight"),
    (r"language_model\.output\.weight", r"lm_head.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.weight", r"model.language_model.layers.\1.self_attn.o_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.weight", r"model.language_model.layers.\1.mlp.gate_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.weight", r"model.language_model.layers.\1.mlp.up_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.weight", r"model.language_model.layers.\1.mlp.down_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.weight", r"model.language_model.layers.\1.input_layernorm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.weight", r"model.language_model.layers.\1.post_attention_layernorm.weight"),
    (r"vision_model\.embeddings\.class_embedding", r"model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", r"model.vision_tower.embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"model.vision_tower.embeddings.patch_embeddings.projection.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls([12])", r"model.vision_tower.encoder.layer.\1.lambda_\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)", r"model.vision_tower.encoder.layer.\1.attention.projection_layer.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"model.vision_tower.encoder.layer.\1.layernorm_before.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"model.vision_tower.encoder.layer.\1.layernorm_after.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"model.vision_tower.encoder.layer.\1.mlp.\2.\3"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
]
_WQKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.weight")
_VQKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
_LLM_QKV = "model.language_model.layers.{}.self_attn.{}_proj.weight"
_VIS_QKV = "model.vision_tower.encoder.layer.{}.attention.{}_proj.{}"


def _native_pattern(native: str) -> str:
    """A native name template (with \\1, \\2 where the remote name's groups go) as a regex."""
    return "".join(re.escape(piece) if i % 2 == 0 else "([^.]+)" for i, piece in enumerate(re.split(r"\\(\d)", native)))


def split_wqkv(w: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's packed [(heads + 2 kv_heads) head_dim, hidden] -> q, k, v weights."""
    groups = heads // kv_heads
    head_dim = w.shape[0] // (heads + 2 * kv_heads)
    g = w.reshape(kv_heads, groups + 2, head_dim, w.shape[-1])
    return (g[:, :groups].reshape(heads * head_dim, -1), g[:, -2].reshape(kv_heads * head_dim, -1),
            g[:, -1].reshape(kv_heads * head_dim, -1))


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    groups, hidden = heads // kv_heads, q.shape[-1]
    head_dim = q.shape[0] // heads
    return torch.cat([q.reshape(kv_heads, groups, head_dim, hidden), k.reshape(kv_heads, 1, head_dim, hidden),
                      v.reshape(kv_heads, 1, head_dim, hidden)], dim=1).reshape(-1, hidden)


def to_native(state: dict[str, torch.Tensor], heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Remote-layout tensors renamed (and qkv split) for InternVLForConditionalGeneration; a name
    this mapping does not know is a KeyError."""
    out = {}
    for name, t in state.items():
        if m := _WQKV.fullmatch(name):
            for part, w in zip("qkv", split_wqkv(t, heads, kv_heads)):
                out[_LLM_QKV.format(m[1], part)] = w
            continue
        if m := _VQKV.fullmatch(name):
            for part, w in zip("qkv", t.chunk(3, dim=0)):
                out[_VIS_QKV.format(m[1], part, m[2])] = w
            continue
        for remote, native in _NAMES:
            if re.fullmatch(remote, name):
                out[re.sub(f"^{remote}$", native, name)] = t
                break
        else:
            raise KeyError(name)
    return out


def to_remote(state: dict[str, torch.Tensor], heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """The inverse of `to_native` (what make-checkpoint writes)."""
    out, inverse = {}, [(_native_pattern(n), r) for r, n in _NAMES]
    for name, t in state.items():
        if m := re.fullmatch(_LLM_QKV.format(r"(\d+)", "q"), name):
            parts = [state[_LLM_QKV.format(m[1], p)] for p in "qkv"]
            out[f"language_model.model.layers.{m[1]}.attention.wqkv.weight"] = pack_wqkv(*parts, heads, kv_heads)
            continue
        if m := re.fullmatch(_VIS_QKV.format(r"(\d+)", "q", r"(weight|bias)"), name):
            parts = [state[_VIS_QKV.format(m[1], p, m[2])] for p in "qkv"]
            out[f"vision_model.encoder.layers.{m[1]}.attn.qkv.{m[2]}"] = torch.cat(parts, dim=0)
            continue
        if re.fullmatch(r".*\.(k|v)_proj\.(weight|bias)", name) and ("self_attn" in name or "attention." in name):
            continue  # packed with its q
        for native_re, remote in inverse:
            if m := re.fullmatch(native_re, name):
                out[_fill(remote, m.groups())] = t
                break
        else:
            raise KeyError(name)
    return out


def _fill(remote: str, groups: tuple[str, ...]) -> str:
    """The remote pattern with its capture groups replaced by the matched values, in order."""
    it = iter(groups)
    return re.sub(r"\([^)]*\)", lambda _: next(it), remote).replace("\\.", ".")

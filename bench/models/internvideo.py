"""InternVideo2.5-Chat (InternVL2.5 with an InternLM2.5-7B LLM and InternViT-300M) in its published
remote-code layout (bench.models.internvl_remote), loaded onto transformers' native
InternVLForConditionalGeneration with a Llama language model: the checkpoint's .py files are never
imported, only its config.json, tokenizer files and safetensors are read.

Visual tokens: as the published model (modeling_internvl_chat_hico2) does, the pixel-shuffled
InternViT tokens of each group of 4 consecutive frames (4 x 256 at 448 px) are merged by token
merging (bench.models.token_merge) down to 64, i.e. 16 tokens per frame, before the projector. So a
request's frame count must be a multiple of 4; every image or frame is one 448-px tile (no tiling,
as the model's video path cuts frames). Frames are labelled "Frame{i}: " and each is
`<img>` + 16 `<IMG_CONTEXT>` + `</img>`; the chat template is `internvl2_5`; the InternLM2
tokenizer adds BOS. Which model it is, is read from config.json's auto_map (data, never imported):
`modeling_internvl_chat_hico2` is InternVideo2.5; a config naming InternVL2.5's own
`modeling_internvl_chat` (InternVL2.5-8B has this layout too) runs unmerged, 256 tokens per tile,
still images tiled as the -hf InternVL family does.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from bench.errors import UsageError
from bench.models.base import PreparedPrompt, VLMAdapter
from bench.models.family import DEFAULT_MAX_TILES, RANDOM_WEIGHTS_MARK, Family
from bench.models.files import (check_shapes, checked_weights, named_tokenizer, one_line, read_json_object,
                                require_tokenizer, weight_files)
from bench.models.internvl import IMAGE_CONTEXT, InternVLAdapter, internvl_image_processor
from bench.models.internvl_remote import ARCHITECTURE, ROPE_TYPES, to_native, to_remote
from bench.models.templates import ConvTemplate
from bench.models.token_merge import merge_tokens
from bench.models.visual import as_visual, group_refusal

GROUP_FRAMES = 4  # frames merged together (the published model's local_num_frames)
FRAME_TOKENS = 16  # visual tokens per frame after merging (its num_tome_tokens 64 / 4)
FRAME_TOKENS_KEY = "bench_frame_tokens"  # config.json of tiny test checkpoints: another per-frame count
ROPE_SCALING_KEY = "internlm2_rope_scaling"  # the checkpoint's rope_scaling, kept on the native config


class InternVideoAdapter(InternVLAdapter):
    family = "internvideo"

    def __init__(self, model, tokenizer, image_processor, template: ConvTemplate, weights: str, name: str,
                 frame_tokens: int | None = FRAME_TOKENS, max_tiles: int = 1):
        """frame_tokens: tokens per frame after merging; None: no merging (InternVL2.5's own model,
        tiles of 256 tokens, still images tiled up to `max_tiles`)."""
        super().__init__(model, tokenizer, image_processor, template, weights, name,
                         max_tiles=1 if frame_tokens else max_tiles)
        self.frame_tokens = frame_tokens
        if frame_tokens:
            self.tokens_per_tile = frame_tokens
            self.visual_group = GROUP_FRAMES
        self.metric_heads = model.config.get_text_config().num_attention_heads

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        return VLMAdapter._tokenize(self, text, add_bos)  # InternLM2: BOS first

    def prepare_text(self, question: str, visual=None) -> PreparedPrompt:
        if self.frame_tokens and visual is not None and len(as_visual(visual)) % GROUP_FRAMES:
            raise UsageError(group_refusal(self.name, GROUP_FRAMES, len(as_visual(visual))))
        return super().prepare_text(question, visual)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.frame_tokens:
            return super().encode_image(pixel_values)
        m = self.model.model
        want_hidden = self.feature_layer != -1
        out = m.vision_tower(pixel_values=pixel_values, output_hidden_states=want_hidden, return_dict=True)
        feats = (out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state)[:, 1:]  # CLS
        tiles, n, c = feats.shape
        side = int(n ** 0.5)
        feats = m.pixel_shuffle(feats.reshape(tiles, side, side, c), scale_factor=self.downsample)
        feats = feats.reshape(tiles // GROUP_FRAMES, -1, feats.shape[-1])
        feats = merge_tokens(feats, GROUP_FRAMES * self.frame_tokens, self.metric_heads)
        feats = m.multi_modal_projector(feats.reshape(tiles, self.frame_tokens, -1)).to(self.dtype)
        return feats.reshape(1, -1, feats.shape[-1])


# ------------------------------------------------------------------------------------------ layout
def is_internvideo_dir(path: Path, config: dict) -> bool:
    model_type = config.get("model_type")  # when it says, it must say this layout's
    return model_type in (None, "internvl_chat") and (ARCHITECTURE in (config.get("architectures") or [])
                                                      or model_type == "internvl_chat")


def _refusal(config: dict) -> str | None:
    """Why this remote-code config cannot be mapped onto the native classes (None: it can)."""
    llm, vis = config.get("llm_config"), config.get("vision_config")
    if not isinstance(llm, dict) or not isinstance(vis, dict):
        return "config.json lacks llm_config or vision_config"
    if llm.get("model_type") != "internlm2":
        return (f"its language model is {llm.get('model_type')!r}; this layout is loaded for InternLM2 "
                "(InternVideo2.5-Chat-8B); convert other InternVL checkpoints to the -hf layout")
    if llm.get("bias"):
        return "its InternLM2 has biases (bias: true), which the native Llama mapping does not carry"
    scaling = llm.get("rope_scaling")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ROPE_TYPES:
        return f"rope_scaling {scaling} is not one of {', '.join(ROPE_TYPES)}"
    if vis.get("qk_normalization") or vis.get("norm_type", "layer_norm") != "layer_norm":
        return "its InternViT uses qk_normalization or RMSNorm (InternViT-6B), which this mapping does not carry"
    if config.get("ps_version", "v2") != "v2":
        return f"ps_version {config.get('ps_version')!r} (only v2 pixel shuffle is native)"
    if config.get("quantization_config"):
        return "pre-quantized weights in this layout are not supported"
    return None


def native_config(config: dict, image_token_id: int, bos: int | None = None, eos: int | None = None
                  ) -> InternVLConfig:
    llm, vis = config["llm_config"], config["vision_config"]
    size = int(config.get("force_image_size") or vis["image_size"])
    rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
    scaling = llm.get("rope_scaling")
    kind = scaling and scaling.get("type", scaling.get("rope_type"))
    if kind == "linear":
        rope.update(rope_type="linear", factor=float(scaling["factor"]))
    # InternLM2's dynamic NTK scaling changes the rotary base only past max_position_embeddings,
    # which no prompt reaches (longer ones are refused before a run): there it is the plain rope,
    # without transformers' dynamic update (a host-side check per forward, which CUDA graphs
    # cannot capture).
    native = InternVLConfig(
        vision_config=dict(
            hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
            num_hidden_layers=vis["num_hidden_layers"], num_attention_heads=vis["num_attention_heads"],
            image_size=[size, size], patch_size=[vis["patch_size"]] * 2, attention_bias=bool(vis.get("qkv_bias", True)),
            use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)),
            hidden_act=vis.get("hidden_act", "gelu"), layer_scale_init_value=float(vis.get("initializer_factor", 0.1)),
            use_mean_pooling=True, use_absolute_position_embeddings=True,
        ),
        text_config=dict(
            model_type="llama", hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"], num_attention_heads=llm["num_attention_heads"],
            num_key_value_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
            vocab_size=llm["vocab_size"], max_position_embeddings=llm.get("max_position_embeddings", 32768),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)), rope_parameters=rope, hidden_act="silu",
            attention_bias=False, mlp_bias=False, tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
            bos_token_id=llm.get("bos_token_id", bos), eos_token_id=llm.get("eos_token_id", eos),
            pad_token_id=llm.get("pad_token_id"),
        ),
        image_token_id=image_token_id, image_seq_length=FRAME_TOKENS,
        downsample_ratio=float(config.get("downsample_ratio", 0.5)), projector_hidden_act="gelu",
        vision_feature_layer=int(config.get("select_layer", -1)), vision_feature_select_strategy="default",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
    )
    native.__dict__[ROPE_SCALING_KEY] = dict(scaling) if scaling else None
    return native


def merged_frame_tokens(config: dict) -> int | None:
    """Tokens per frame after merging: InternVideo2.5's model (its auto_map names
    modeling_internvl_chat_hico2) merges to 16; None: InternVL2.5's own, unmerged."""
    if FRAME_TOKENS_KEY in config:
        return int(config[FRAME_TOKENS_KEY])
    auto = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    return FRAME_TOKENS if any("hico" in str(v) for v in auto.values()) else None


def _heads(config: dict) -> tuple[int, int]:
    llm = config["llm_config"]
    return llm["num_attention_heads"], llm.get("num_key_value_heads", llm["num_attention_heads"])


def internvideo_tokenizer(path: Path, what: str):
    """The checkpoint's tokenizer from tokenizer.json, else from SentencePiece's tokenizer.model (as
    published, with InternLM2's tokenizer_config.json): the classes are named here, because
    AutoTokenizer would read config.json, whose auto_map names the checkpoint's own code."""
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    return named_tokenizer(path, what, (("tokenizer.json", PreTrainedTokenizerFast), ("tokenizer.model", LlamaTokenizer)))


def _image_token(tokenizer, what: str) -> int:
    found = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT)
    if found is None or found == tokenizer.unk_token_id:
        raise UsageError(f"{what}: the tokenizer has no {IMAGE_CONTEXT} token; copy the checkpoint's tokenizer files")
    return found


def check_internvideo(path: Path, config: dict) -> None:
    """The config maps onto the native classes, and the safetensors hold every tensor it implies in
    its shape (before anything loads)."""
    what = f"--model-path {path}"
    why = _refusal(config)
    if why:
        raise UsageError(f"{what}: InternVL remote-code checkpoint not loadable natively: {why}")
    tensors = checked_weights(path, what)
    require_tokenizer(path, what)
    try:
        native = native_config(config, 0)
        frame_tokens = merged_frame_tokens(config)
        with torch.device("meta"):
            model = InternVLForConditionalGeneration._from_config(native)
    except Exception as e:  # noqa: BLE001 - transformers' config validation and torch raise many error types
        raise UsageError(f"{what}: {path / 'config.json'} does not describe a model ({one_line(e)}); restore the "
                         "checkpoint's original file") from None
    side = native.vision_config.image_size[0] // native.vision_config.patch_size[0]
    per_frame = int(side * native.downsample_ratio) ** 2  # a frame's tokens after the pixel shuffle
    if frame_tokens is not None and not 1 <= frame_tokens <= per_frame:
        raise UsageError(f"{what}: the token merging keeps {frame_tokens} tokens per frame but the vision tower "
                         f"gives {per_frame} ({side}x{side} patches, downsample_ratio {native.downsample_ratio}); "
                         "restore the checkpoint's original config.json")
    expected = to_remote(model.state_dict(), *_heads(config))
    if native.tie_word_embeddings:
        expected.pop("language_model.output.weight", None)
    check_shapes(tensors, {k: tuple(v.shape) for k, v in expected.items()}, what, path)
    _image_token(internvideo_tokenizer(path, what), what)


def load_internvideo(path: Path, template: ConvTemplate, device: torch.device, dtype: torch.dtype,
                     weights: str, max_tiles: int = DEFAULT_MAX_TILES) -> InternVideoAdapter:
    from safetensors.torch import load_file

    what = f"--model-path {path}"
    config = read_json_object(path / "config.json", what)
    tokenizer = internvideo_tokenizer(path, what)
    native = native_config(config, _image_token(tokenizer, what), tokenizer.bos_token_id, tokenizer.eos_token_id)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path, what):
        state.update(load_file(str(file)))
    try:
        state = to_native(state, *_heads(config))
    except KeyError as e:
        raise UsageError(f"{what}: tensor {e.args[0]!r} is not part of the InternVL remote-code layout") from None
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(native, dtype=dtype).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (native.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UsageError(f"{what}: tensor {(missing or unexpected)[0]!r} is "
                         f"{'missing from' if missing else 'not expected in'} the weights in {path}")
    if native.tie_word_embeddings:
        model.tie_weights()
    frame_tokens = merged_frame_tokens(config)
    processor = internvl_image_processor(native.vision_config.image_size[0], 1 if frame_tokens else max_tiles)
    adapter = InternVideoAdapter(model, tokenizer, processor, template, weights, path.name, frame_tokens, max_tiles)
    adapter.identity = str(path.resolve())
    return adapter


def remote_config(adapter: InternVideoAdapter) -> dict:
    """config.json of the published layout for the adapter's model."""
    cfg = adapter.model.config
    t, v = cfg.get_text_config(), cfg.vision_config
    rope = dict(t.rope_parameters)
    scaling = cfg.__dict__.get(ROPE_SCALING_KEY)
    out = {
        "architectures": [ARCHITECTURE],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat_hico2.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat_hico2.InternVLChatModel"},
        "model_type": "internvl_chat", "template": "internvl2_5", "ps_version": "v2", "select_layer": -1,
        "downsample_ratio": cfg.downsample_ratio, "force_image_size": v.image_size[0], "dynamic_image_size": True,
        "use_thumbnail": True, "max_dynamic_patch": 12, "min_dynamic_patch": 1, "torch_dtype": str(adapter.dtype)[6:],
        "llm_config": {
            "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": rope["rope_theta"], "rope_scaling": scaling, "hidden_act": "silu", "bias": False,
            "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        },
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "image_size": v.image_size[0],
            "patch_size": v.patch_size[0], "num_channels": 3, "qkv_bias": True, "qk_normalization": False,
            "norm_type": "layer_norm", "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu",
            "initializer_factor": v.layer_scale_init_value, "drop_path_rate": 0.0, "use_flash_attn": True,
        },
    }
    if not adapter.frame_tokens:  # InternVL2.5's own model
        out["auto_map"] = {k: v.replace("_hico2", "") for k, v in out["auto_map"].items()}
    elif adapter.frame_tokens != FRAME_TOKENS:
        out[FRAME_TOKENS_KEY] = adapter.frame_tokens
    if cfg.__dict__.get(RANDOM_WEIGHTS_MARK):
        out[RANDOM_WEIGHTS_MARK] = True
    return out


def save_internvideo(adapter: InternVideoAdapter, out: Path, max_shard_size: str | None = None) -> None:
    """The published layout: config.json, safetensors under the remote names (sharded with an index
    above `max_shard_size`), tokenizer files."""
    import json

    from huggingface_hub import save_torch_state_dict

    t = adapter.model.config.get_text_config()
    state = {k: v for k, v in adapter.model.state_dict().items()
             if not (t.tie_word_embeddings and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(to_remote(state, t.num_attention_heads, t.num_key_value_heads), out,
                          **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    (out / "config.json").write_text(json.dumps(remote_config(adapter), indent=2) + "\n")
    adapter.tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------------------ presets
def build_internvideo(preset, tokenizer, template: ConvTemplate, device, dtype, max_tiles: int) -> InternVideoAdapter:
    llm, vis = preset.llm, preset.vision
    config = {
        "downsample_ratio": 0.5, "force_image_size": vis.image_size,
        "llm_config": {"model_type": "internlm2", "hidden_size": llm.hidden, "intermediate_size": llm.mlp,
                       "num_hidden_layers": llm.layers, "num_attention_heads": llm.heads,
                       "num_key_value_heads": llm.kv_heads, "vocab_size": llm.vocab,
                       "max_position_embeddings": llm.max_pos, "rms_norm_eps": llm.rms_norm_eps,
                       "rope_theta": llm.rope_theta, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                       "tie_word_embeddings": llm.tie_embeddings, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id},
        "vision_config": {"hidden_size": vis.hidden, "intermediate_size": vis.mlp, "num_hidden_layers": vis.layers,
                          "num_attention_heads": vis.heads, "image_size": vis.image_size, "patch_size": vis.patch},
    }
    native = native_config(config, tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT))
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(native, dtype=dtype).eval()
    model.config.__dict__[RANDOM_WEIGHTS_MARK] = True
    processor = internvl_image_processor(preset.vision.image_size, 1)
    return InternVideoAdapter(model, tokenizer, processor, template, "random", preset.name,
                              preset.frame_tokens or FRAME_TOKENS)


def _text_config(path: Path):
    config = read_json_object(path / "config.json", f"--model-path {path}")
    return native_config(config, 0).get_text_config()


FAMILY = Family(
    name="internvideo", layout="InternVL remote-code layout (InternVLChatModel with InternLM2)",
    default_conv_mode="internvl2_5", detect=is_internvideo_dir,
    load=lambda path, config, template, device, dtype, weights, quantization, strip_quant, max_tiles:
        load_internvideo(path, template, device, dtype, weights, max_tiles),
    build=build_internvideo, save=save_internvideo, llm_key="language_model.", check=check_internvideo,
    text_config=_text_config, architectures=("InternVLChatModel",),
    visual_group=lambda config: GROUP_FRAMES if config is None or merged_frame_tokens(config) else 1,
    # tiled where frames' tokens are not merged (merging models and presets take each image whole)
    tiles_images=lambda config: config is not None and not merged_frame_tokens(config),
)

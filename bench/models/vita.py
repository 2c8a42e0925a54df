"""VITA-1.5 (`VITAQwen2ForCausalLM`: Qwen2.5-7B-Instruct + InternViT-300M-448px + mlp2x_gelu, and an
audio encoder) in its published layout, loaded onto transformers' native
InternVLForConditionalGeneration with a Qwen2 language model and the projector's LayerNorm removed
(bench.models.internvl.vita_projector): only config.json, the tokenizer files and safetensors are
read; no code of the checkpoint is imported.

Where the names come from (VITA-MLLM/VITA on GitHub):
- vita/model/language_model/vita_qwen2.py: `VITAQwen2ForCausalLM(Qwen2ForCausalLM)` with a
  `VITAQwen2Model(VITAMetaModel, Qwen2Model)`, so the LLM tensors keep Qwen2's names
  (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`).
- vita/model/vita_arch.py: `VITAMetaModel` holds `vision_tower`, `mm_projector` and
  `audio_encoder` under `model.`.
- vita/model/multimodal_encoder/internvit/internvit_encoder.py: `InternViTVisionTower` keeps
  InternViT (`InternVisionModel`) as `.vision_tower`, hence `model.vision_tower.vision_tower.*`
  with InternViT's own names (embeddings.class_embedding / patch_embedding / position_embedding,
  encoder.layers.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}). Its forward
  takes the last hidden state without CLS, multiplies it by 0.5 (`scale_pix_shuffle`), then
  pixel-shuffles it by 0.5 (InternVL's pixel_shuffle): 256 tokens of 4096 per 448-px tile.
  The 0.5 factor is folded into the projector's first Linear at load (exact: a power of two),
  and unfolded when written.
- vita/model/multimodal_projector/builder.py: `mlp2x_gelu` = nn.Sequential(Linear, GELU, Linear),
  so `model.mm_projector.0.*` and `model.mm_projector.2.*`, the first Linear taking
  `mm_hidden_size` (one revision of builder.py takes `mm_hidden_size * 5`); a published module dump of
  VITA-1.5 shows Linear(4096 -> 3584) (= 4 x 1024 after pixel shuffle): checkpoints whose
  projector input is not 4 x the InternViT width are refused.
- Audio (`model.audio_encoder.*`, its adapter included): not needed for image and video
  questions; every tensor under `model.audio_` is skipped unread.
Prompt (video_audio_demo.py, vita/constants.py): `DEFAULT_IMAGE_TOKEN * p_num + "\\n" + qs`,
i.e. one `<image>` per tile (dynamic_preprocess min_num=1, max_num=12, use_thumbnail) or per frame,
all together before the question, then "\\n" + question, in the `qwen2p5_instruct` template;
the text around the placeholders is tokenized separately (tokenizer_image_token), as here.
vita/conversation.py's qwen2p5_instruct (Qwen2.5's <|im_start|>role\\n...<|im_end|>\\n turns)
picks its system prompt by modality: `IMAGE_SYSTEM` for images, `VIDEO_SYSTEM` for video frames
(the same texts as mixtral_two's in upstream vita/conversation.py; the qwen2p5_instruct entry
comes from a later copy of that file and is not confirmed upstream). With that template they
replace its generic system prompt; another --conv-mode keeps its own.
Still images are tiled by InternVL's dynamic_preprocess (1..12 tiles + thumbnail, here
GotOcr2ImageProcessor's crop_to_patches, ImageNet mean/std as InternViT's CLIPImageProcessor).

Not confirmed against a real checkpoint (none is read here): the exact config.json keys beyond
`architectures`/`model_type`/`mm_projector_type`/`mm_hidden_size` (the InternViT config lives in
the separate `mm_vision_tower` folder, so its geometry is read from the tensor shapes here,
with InternViT's head width of 64 and LayerNorm eps 1e-6); the model_type's spelling (matched
case-insensitively); and the video frames' preprocessing: VITA pads frames to a square before
resizing (image_aspect_ratio "pad"), here a frame is resized to one 448-px tile as InternVL does.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from bench.errors import UsageError
from bench.models.base import PreparedPrompt, refuse_placeholder
from bench.models.family import DEFAULT_MAX_TILES, RANDOM_WEIGHTS_MARK, Family
from bench.models.files import (check_weight_dtype, checked_weights, named_tokenizer, one_line, read_json_object,
                                require_tokenizer, weight_files)
from bench.models.internvl import InternVLAdapter, internvl_image_processor, vita_projector
from bench.models.internvl_remote import to_native as internvit_to_native
from bench.models.internvl_remote import to_remote as internvit_to_remote
from bench.models.templates import ConvTemplate

ARCHITECTURE, MODEL_TYPE = "VITAQwen2ForCausalLM", "vita-qwen2"
IMAGE_PLACEHOLDER = "<image>"  # DEFAULT_IMAGE_TOKEN: one per tile / frame
PIXEL_SHUFFLE_SCALE = 0.5  # InternViTVisionTower.scale_pix_shuffle: multiplies the features too
VIT = "model.vision_tower.vision_tower."
HEAD_DIM = 64  # InternViT-300M: 1024 / 16 heads
_AUDIO = re.compile(r"model\.audio_")
_SYSTEM = ("You are an AI robot and your name is VITA. \n- You are a multimodal large language model developed by the "
           "open source community. Your aim is to be helpful, honest and harmless. \n- You support the ability to "
           "communicate fluently and answer user questions in multiple languages of the user's choice. \n- If the "
           "user corrects the wrong answer you generated, you will apologize and discuss the correct answer with "
           "the user. \n- You must answer the question strictly according to the content of the {0} given by the "
           "user, and it is strictly forbidden to answer the question without the content of the {0}. Please note "
           "that you are seeing the {0}, not the {1}.")
IMAGE_SYSTEM, VIDEO_SYSTEM = _SYSTEM.format("image", "video"), _SYSTEM.format("video", "image")
VITA_TEMPLATE = "qwen2p5_instruct"


class VITAAdapter(InternVLAdapter):
    family = "vita"

    def prepare_text(self, question: str, visual=None) -> PreparedPrompt:
        refuse_placeholder(self, question, IMAGE_PLACEHOLDER)  # VITA's tokenizer_image_token splits at it
        images, video = self.images_of(visual)
        template = self.template
        if template.name == VITA_TEMPLATE:
            template = dataclasses.replace(template, system=VIDEO_SYSTEM if video else IMAGE_SYSTEM)
        head, suffix_text = template.split(question, "")
        # "<image>" x tiles + "\n" + question: the placeholders are adjacent, so the text between
        # images is empty; the "\n" closes the cacheable prefix.
        segments = [self._tokenize_fixed(head, add_bos=True)] + [[] for _ in images[1:]]
        segments.append(self._tokenize_fixed("\n", add_bos=False))
        counts = [self.tiles(im, video) * self.tokens_per_tile for im in images]
        return PreparedPrompt(segments, counts, self._tokenize(suffix_text, add_bos=False))


# ------------------------------------------------------------------------------------------ layout
def is_vita_dir(path: Path, config: dict) -> bool:
    model_type = config.get("model_type")  # when it says, it must say this layout's
    return (model_type is None or str(model_type).lower() == MODEL_TYPE) and (
        ARCHITECTURE in (config.get("architectures") or []) or str(model_type).lower() == MODEL_TYPE)


def _vision_dims(tensors: dict[str, tuple[str, tuple[int, ...]]], what: str) -> dict:
    """InternViT's geometry from its tensor shapes (its config is not part of the checkpoint)."""
    try:
        hidden, _, patch, _ = tensors[VIT + "embeddings.patch_embedding.weight"][1]
        positions = tensors[VIT + "embeddings.position_embedding"][1][1] - 1
        mlp = tensors[VIT + "encoder.layers.0.mlp.fc1.weight"][1][0]
        proj_in = tensors["model.mm_projector.0.weight"][1][1]
    except (KeyError, IndexError, ValueError):
        raise UsageError(f"{what}: the weights hold no InternViT vision tower and mlp2x_gelu projector under "
                         f"{VIT!r} and 'model.mm_projector.'; VITA-1.5 checkpoints carry both") from None
    layers = len({n for n in tensors if re.fullmatch(re.escape(VIT) + r"encoder\.layers\.\d+\.attn\.qkv\.weight", n)})
    side = int(round(positions ** 0.5))
    if side * side != positions or hidden % HEAD_DIM or proj_in != hidden * 4:
        raise UsageError(f"{what}: vision tower {hidden} wide with {positions} positions and a projector taking "
                         f"{proj_in} features is not VITA-1.5's InternViT + 0.5 pixel shuffle")
    return {"hidden": hidden, "mlp": mlp, "layers": layers, "heads": hidden // HEAD_DIM, "patch": patch,
            "image_size": side * patch}


def _refusal(config: dict) -> str | None:
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        return f"mm_projector_type {config.get('mm_projector_type')!r} (only mlp2x_gelu is mapped)"
    if config.get("quantization_config"):
        return "pre-quantized weights in this layout are not supported"
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    return None


def native_config(config: dict, vis: dict, image_token_id: int, eos: int | None = None) -> InternVLConfig:
    native = InternVLConfig(
        vision_config=dict(
            hidden_size=vis["hidden"], intermediate_size=vis["mlp"], num_hidden_layers=vis["layers"],
            num_attention_heads=vis["heads"], image_size=[vis["image_size"]] * 2, patch_size=[vis["patch"]] * 2,
            attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu",
            layer_scale_init_value=0.1, use_mean_pooling=True, use_absolute_position_embeddings=True,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            vocab_size=config["vocab_size"], max_position_embeddings=config.get("max_position_embeddings", 32768),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rope_theta", 1e6))},
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), use_sliding_window=False,
            bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id", eos),
            pad_token_id=config.get("pad_token_id"),
        ),
        # The placeholders never reach the embedding (prepare_text cuts the prompt at them): an id
        # past the vocabulary, which the published tokenizer has no token for.
        image_token_id=image_token_id, image_seq_length=int((vis["image_size"] // vis["patch"]) ** 2 // 4),
        downsample_ratio=PIXEL_SHUFFLE_SCALE, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    return native


def to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published names -> InternVLForConditionalGeneration's; audio tensors dropped; an unknown
    name is a KeyError."""
    out, vision = {}, {}
    for name, t in state.items():
        if _AUDIO.match(name):
            continue
        if name.startswith(VIT):
            vision["vision_model." + name[len(VIT):]] = t
        elif m := re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", name):
            scale = PIXEL_SHUFFLE_SCALE if (m[1], m[2]) == ("0", "weight") else 1.0
            out[f"model.multi_modal_projector.linear_{1 if m[1] == '0' else 2}.{m[2]}"] = t * scale if scale != 1 else t
        elif re.fullmatch(r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)", name):
            out["model.language_model." + name[len("model."):]] = t
        elif name == "lm_head.weight":
            out[name] = t
        else:
            raise KeyError(name)
    out.update(internvit_to_native(vision, 1, 1))
    return out


def to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, vision = {}, {}
    for name, t in state.items():
        if name.startswith("model.vision_tower."):
            vision[name] = t
        elif m := re.fullmatch(r"model\.multi_modal_projector\.linear_([12])\.(weight|bias)", name):
            scale = 1 / PIXEL_SHUFFLE_SCALE if (m[1], m[2]) == ("1", "weight") else 1.0
            out[f"model.mm_projector.{0 if m[1] == '1' else 2}.{m[2]}"] = t * scale if scale != 1 else t
        elif name.startswith("model.language_model."):
            out["model." + name[len("model.language_model."):]] = t
        elif name == "lm_head.weight":
            out[name] = t
        else:
            raise KeyError(name)
    out.update({VIT + k[len("vision_model."):]: v for k, v in internvit_to_remote(vision, 1, 1).items()})
    return out


def vita_tokenizer(path: Path, what: str):
    """tokenizer.json, else Qwen2's vocab.json + merges.txt; the classes are named here (config.json's
    model_type is VITA's own, which AutoTokenizer does not know)."""
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    return named_tokenizer(path, what, (("tokenizer.json", PreTrainedTokenizerFast), ("vocab.json", Qwen2Tokenizer)))


def check_vita(path: Path, config: dict) -> None:
    """The config and the safetensors describe VITA-1.5 with every tensor in its shape (before
    anything loads); the audio encoder's tensors are not looked at."""
    what = f"--model-path {path}"
    why = _refusal(config)
    if why:
        raise UsageError(f"{what}: VITA checkpoint not loadable natively: {why}")
    tensors = checked_weights(path, what)
    require_tokenizer(path, what)
    vis = _vision_dims(tensors, what)
    proj_in = tensors["model.mm_projector.0.weight"][1][1]
    if config.get("mm_hidden_size", proj_in) != proj_in:
        raise UsageError(f"{what}: {path / 'config.json'} gives mm_hidden_size {config['mm_hidden_size']} but the "
                         f"projector takes {proj_in} features; the weights do not belong to this config.json")
    try:
        native = native_config(config, vis, int(config["vocab_size"]))
        with torch.device("meta"):
            model = InternVLForConditionalGeneration._from_config(native)
        vita_projector(model)
    except Exception as e:  # noqa: BLE001 - transformers' config validation and torch raise many error types
        raise UsageError(f"{what}: {path / 'config.json'} does not describe a model ({one_line(e)}); restore the "
                         "checkpoint's original file") from None
    expected = {k: tuple(v.shape) for k, v in to_published(model.state_dict()).items()}
    if native.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for name, (_, shape) in tensors.items():
        if _AUDIO.match(name):
            continue
        if name not in expected:
            raise UsageError(f"{what}: tensor {name!r} is not part of VITA-1.5's layout")
        check_weight_dtype(name, tensors[name][0], what, path)
        if tuple(shape) != expected.pop(name):
            raise UsageError(f"{what}: tensor {name!r} has shape {list(shape)}, which config.json does not "
                             f"give; restore the checkpoint's original config.json")
    if expected:
        raise UsageError(f"{what}: tensor {next(iter(expected))!r} is missing from {path}; the checkpoint is incomplete")


def load_vita(path: Path, template: ConvTemplate, device: torch.device, dtype: torch.dtype, weights: str,
              max_tiles: int = DEFAULT_MAX_TILES) -> VITAAdapter:
    from safetensors import safe_open

    what = f"--model-path {path}"
    config = read_json_object(path / "config.json", what)
    tokenizer = vita_tokenizer(path, what)  # (check_vita ran before: bench.models.loader)
    vis = _vision_dims(checked_weights(path, what), what)
    native = native_config(config, vis, int(config["vocab_size"]), tokenizer.convert_tokens_to_ids("<|im_end|>"))
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path, what):
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if not _AUDIO.match(k)})
    try:
        state = to_native(state)
    except KeyError as e:
        raise UsageError(f"{what}: tensor {e.args[0]!r} is not part of VITA-1.5's layout") from None
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(native, dtype=dtype).eval()
    vita_projector(model)
    model.load_state_dict(state, strict=not native.tie_word_embeddings)
    if native.tie_word_embeddings:
        model.tie_weights()
    processor = internvl_image_processor(vis["image_size"], max_tiles)
    adapter = VITAAdapter(model, tokenizer, processor, template, weights, path.name, max_tiles)
    adapter.identity = str(path.resolve())
    return adapter


def published_config(adapter: VITAAdapter) -> dict:
    cfg = adapter.model.config
    t, v = cfg.get_text_config(), cfg.vision_config
    out = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "hidden_act": "silu",
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"], "tie_word_embeddings": t.tie_word_embeddings,
        "use_sliding_window": False, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "torch_dtype": str(adapter.dtype)[6:], "mm_vision_tower": "InternViT-300M-448px",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": v.hidden_size * 4, "mm_vision_select_layer": -1,
        "image_aspect_ratio": "square", "mm_audio_encoder": "audio-encoder-Qwen2-7B-instruct-weight-base-11wh-tunning",
    }
    if cfg.__dict__.get(RANDOM_WEIGHTS_MARK):
        out[RANDOM_WEIGHTS_MARK] = True
    return out


def save_vita(adapter: VITAAdapter, out: Path, max_shard_size: str | None = None) -> None:
    """The published layout: config.json, safetensors under VITA's names (sharded with an index
    above `max_shard_size`), tokenizer files. No audio encoder is written."""
    from huggingface_hub import save_torch_state_dict

    t = adapter.model.config.get_text_config()
    state = {k: v for k, v in adapter.model.state_dict().items()
             if not (t.tie_word_embeddings and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(to_published(state), out,
                          **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    (out / "config.json").write_text(json.dumps(published_config(adapter), indent=2) + "\n")
    adapter.tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------------------ presets
def build_vita(preset, tokenizer, template: ConvTemplate, device, dtype, max_tiles: int) -> VITAAdapter:
    llm, vis = preset.llm, preset.vision
    config = {"hidden_size": llm.hidden, "intermediate_size": llm.mlp, "num_hidden_layers": llm.layers,
              "num_attention_heads": llm.heads, "num_key_value_heads": llm.kv_heads, "vocab_size": llm.vocab,
              "max_position_embeddings": llm.max_pos, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
              "tie_word_embeddings": llm.tie_embeddings,
              "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
              "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    dims = {"hidden": vis.hidden, "mlp": vis.mlp, "layers": vis.layers, "heads": vis.heads, "patch": vis.patch,
            "image_size": vis.image_size}
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(native_config(config, dims, llm.vocab), dtype=dtype).eval()
    vita_projector(model)
    model.config.__dict__[RANDOM_WEIGHTS_MARK] = True
    processor = internvl_image_processor(preset.vision.image_size, max_tiles)
    return VITAAdapter(model, tokenizer, processor, template, "random", preset.name, max_tiles)


def _text_config(path: Path):
    config = read_json_object(path / "config.json", f"--model-path {path}")
    vis = _vision_dims(checked_weights(path, f"--model-path {path}"), f"--model-path {path}")
    return native_config(config, vis, int(config["vocab_size"])).get_text_config()


FAMILY = Family(
    name="vita", layout="VITA-1.5 layout (VITAQwen2ForCausalLM)", default_conv_mode=VITA_TEMPLATE,
    detect=is_vita_dir,
    load=lambda path, config, template, device, dtype, weights, quantization, strip_quant, max_tiles:
        load_vita(path, template, device, dtype, weights, max_tiles),
    build=build_vita, save=save_vita, llm_key="model.layers.", check=check_vita, text_config=_text_config,
    architectures=("VITAQwen2ForCausalLM",), tiles_images=lambda config: True,
)

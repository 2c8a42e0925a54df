"""VILA1.5 assembled from stock transformers parts (no VILA repo, no trust_remote_code).

On disk: config.json (model_type llava_llama, embedded llm_cfg / vision_tower_cfg /
mm_projector_cfg), llm/ (LlamaForCausalLM + tokenizer), vision_tower/ (SiglipVisionModel +
preprocessor_config.json), mm_projector/ (config.json + model.safetensors, keys layers.{1,2,4}.*).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel,
)

from bench.errors import UsageError
from bench.models.base import PreparedPrompt, VLMAdapter, refuse_placeholder
from bench.models.cache_arg import cache_arg
from bench.models.family import RANDOM_WEIGHTS_MARK, Family
from bench.models.files import (
    check_awq_tensors, check_feature_layer, check_layer_counts, check_shapes, checked_weights, one_line,
    read_json_object, require_preprocessor, require_tokenizer,
)
from bench.models.native import image_processor_from, pretrained, tokenizer_from
from bench.models.templates import ConvTemplate

IMAGE_PLACEHOLDER = "<image>"  # DEFAULT_IMAGE_TOKEN of VILA's code, where its tokenizer_image_token splits a prompt


class DownSampleBlock(nn.Module):
    """VILA's mlp_downsample front: N tokens -> sqrt(N) x sqrt(N) grid, odd sides zero-padded,
    2x2 neighbourhoods folded into channels (the permutation of VILA's flat_square)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, -1)
        n, w, h, c = x.shape
        if w % 2 == 1:
            x = torch.cat([x, x.new_zeros(n, 1, h, c)], dim=1)
            n, w, h, c = x.shape
        if h % 2 == 1:
            x = torch.cat([x, x.new_zeros(n, w, 1, c)], dim=2)
            n, w, h, c = x.shape
        x = x.contiguous().view(n, w, h // 2, c * 2)
        x = x.permute(0, 2, 1, 3).contiguous().view(n, h // 2, w // 2, c * 4)
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.reshape(n, -1, c * 4)


def mlp_downsample_projector(vision_hidden: int, llm_hidden: int) -> nn.Sequential:
    # Indices match VILA's state dict: layers.1 LayerNorm, layers.2 Linear, layers.4 Linear.
    c4 = vision_hidden * 4
    return nn.Sequential(DownSampleBlock(), nn.LayerNorm(c4), nn.Linear(c4, llm_hidden), nn.GELU(),
                         nn.Linear(llm_hidden, llm_hidden))


def downsampled_tokens(patches_per_side: int) -> int:
    half = (patches_per_side + 1) // 2
    return half * half


class VilaModel(nn.Module):
    def __init__(self, llm: LlamaForCausalLM, vision_tower: SiglipVisionModel, mm_projector: nn.Sequential,
                 top_config: dict):
        super().__init__()
        self.llm, self.vision_tower, self.mm_projector = llm, vision_tower, mm_projector
        self.top_config = top_config


class VilaAdapter(VLMAdapter):
    family = "vila"

    def __init__(self, model: VilaModel, tokenizer, image_processor, template: ConvTemplate, weights: str,
                 name: str):
        super().__init__(template)
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.weights, self.name = weights, name
        cfg = model.top_config
        self.select_layer = cfg.get("mm_vision_select_layer", -2)
        self.select_feature = cfg.get("mm_vision_select_feature", "cls_patch")
        self.aspect = cfg.get("image_aspect_ratio", "resize")
        vcfg = model.vision_tower.config
        self.image_tokens = downsampled_tokens(vcfg.image_size // vcfg.patch_size)

    def fit_image(self, image: Image.Image) -> Image.Image:
        if self.aspect == "pad":
            return expand_to_square(image, self.image_processor.image_mean)
        if self.aspect == "resize":
            size = self.model.vision_tower.config.image_size
            image = image if image.mode == "RGB" else image.convert("RGB")
            if not self._processor_squashes_to(size):
                image = image.resize((size, size), Image.BICUBIC)
        return image

    def _processor_squashes_to(self, size: int) -> bool:
        """Whether the image processor itself resizes any image to size x size, bicubic (SigLIP's
        does): VILA's own resize before it is then the same operation, done where the processor
        runs (on the GPU with --preprocess device) instead of on the host first."""
        p = self.image_processor
        target = getattr(p, "size", None) or {}
        return (getattr(p, "do_resize", True) and target.get("height") == size and target.get("width") == size
                and int(getattr(p, "resample", 3)) == 3)

    def prepare_text(self, question: str, visual=None) -> PreparedPrompt:
        refuse_placeholder(self, question, IMAGE_PLACEHOLDER)  # VILA's tokenizer_image_token splits at it
        n = self.image_count(visual)
        head, suffix_text = self.template.split(question, "")
        # VILA tokenizes the text around each image separately (tokenizer_image_token): BOS only
        # on the first chunk; then the tokenized "\n" after every image.
        newline = self._tokenize_fixed("\n", add_bos=False)
        return PreparedPrompt(
            text_segments=[self._tokenize_fixed(head, add_bos=True)] + [list(newline) for _ in range(n)],
            image_tokens=[self.image_tokens] * n,
            suffix_ids=self._tokenize(suffix_text, add_bos=False),
        )

    def language_model(self) -> torch.nn.Module:
        return self.model.llm

    def vision_modules(self) -> list[torch.nn.Module]:
        return [self.model.vision_tower, self.model.mm_projector]

    def text_config(self):
        return self.model.llm.config

    def quantization_targets(self, include_vision: bool) -> list[torch.nn.Module]:
        # The decoder stack only: lm_head stays in dtype.
        return [self.model.llm.model] + (self.vision_modules() if include_vision else [])

    def find_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.llm.get_input_embeddings()

    def decoder_parts(self):
        return self.model.llm.model, self.model.llm.lm_head

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":  # SigLIP has no CLS: cls_patch keeps every token
            feats = feats[:, 1:]
        feats = self.model.mm_projector(feats).to(self.dtype)
        return feats.reshape(1, -1, feats.shape[-1])  # several images: their tokens in order

    def lm_forward(self, inputs_embeds: torch.Tensor, cache, logits_to_keep: int = 1, attention_mask=None,
                   position_ids=None) -> torch.Tensor:
        out = self.model.llm(inputs_embeds=inputs_embeds, **cache_arg(self.model.llm, cache), use_cache=True,
                             logits_to_keep=logits_to_keep, attention_mask=attention_mask,
                             position_ids=position_ids)
        return out.logits


def expand_to_square(image: Image.Image, mean) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


VILA_PARTS = ("llm", "vision_tower", "mm_projector")


def is_vila_dir(path: Path, config: dict) -> bool:
    """VILA's own model_type (or its embedded part configs) whatever folders are there, so that a
    missing part folder is named (check_vila); model_type llava (also Hugging Face LLaVA's) only
    with VILA's part folders."""
    model_type = config.get("model_type")
    if model_type == "llava_llama" or (model_type is None and "llm_cfg" in config):
        return True
    return model_type == "llava" and all((path / d).is_dir() for d in VILA_PARTS)


def _expected_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} the config implies (the model built on the meta device, no memory)."""
    with torch.device("meta"):
        model = model_cls._from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def _part_config(config_cls, folder: Path, what: str):
    data = read_json_object(folder / "config.json", what) if (folder / "config.json").is_file() else None
    if data is None:
        raise UsageError(f"{what}: no config.json in {folder}; copy it from the original checkpoint")
    try:
        return config_cls.from_dict(data)
    except Exception as e:  # noqa: BLE001 - transformers' config validation raises many error types
        raise UsageError(f"{what}: {folder / 'config.json'} does not describe a model ({one_line(e)})") from None


def check_vila(path: Path, config: dict) -> None:
    """Before loading: llm/, vision_tower/ and mm_projector/ each hold a config, whole safetensors
    weights of the shapes their config implies, and (llm/) a tokenizer, (vision_tower/) an image
    processor config."""
    what = f"--model-path {path}"
    missing = [f"{d}/" for d in VILA_PARTS if not (path / d).is_dir()]
    if missing:
        raise UsageError(f"{what}: a VILA checkpoint without {' or '.join(missing)} (VILA keeps its language model, "
                         "vision tower and projector in llm/, vision_tower/ and mm_projector/); copy the folder "
                         "from the original checkpoint")
    configs = {}
    for part, config_cls, model_cls in (("llm", LlamaConfig, LlamaForCausalLM),
                                        ("vision_tower", SiglipVisionConfig, SiglipVisionModel)):
        folder = path / part
        cfg = _part_config(config_cls, folder, what)
        tensors = checked_weights(folder, what)
        quantized = getattr(cfg, "quantization_config", None)
        if isinstance(quantized, dict) and str(quantized.get("quant_method", "")).lower() == "awq":
            group = int(quantized.get("group_size", quantized.get("q_group_size", 128)) or 0)
            check_awq_tensors(tensors, group, what, folder)
        elif not quantized:
            check_layer_counts([cfg], tensors, what, folder)
            try:
                expected = _expected_shapes(model_cls, cfg)
            except Exception as e:  # noqa: BLE001 - as above
                raise UsageError(f"{what}: {folder / 'config.json'} does not describe a model ({one_line(e)})") from None
            check_shapes(tensors, expected, what, folder)
        configs[part] = cfg
    check_feature_layer(config.get("mm_vision_select_layer", -2), configs["vision_tower"].num_hidden_layers,
                        "mm_vision_select_layer", what, path)
    if config.get("mm_vision_select_feature", "cls_patch") not in ("patch", "cls_patch"):
        raise UsageError(f"{what}: {path / 'config.json'}: mm_vision_select_feature "
                         f"{config.get('mm_vision_select_feature')!r} is not patch or cls_patch; restore the "
                         "checkpoint's original file")
    require_tokenizer(path / "llm", what)
    require_preprocessor(path / "vision_tower", what)
    tokenizer_from(path / "llm", what)
    image_processor_from(path / "vision_tower", what)
    proj = path / "mm_projector"
    if not (proj / "config.json").is_file():
        raise UsageError(f"{what}: no config.json in {proj}; copy it from the original checkpoint")
    proj_cfg = read_json_object(proj / "config.json", what)
    if proj_cfg.get("mm_projector_type") != "mlp_downsample":
        raise UsageError(f"{what}: {proj / 'config.json'}: mm_projector_type {proj_cfg.get('mm_projector_type')!r} "
                         "is not supported (supported: mlp_downsample)")
    tensors = checked_weights(proj, what)
    c4, h = configs["vision_tower"].hidden_size * 4, configs["llm"].hidden_size
    check_shapes(tensors, {"layers.1.weight": (c4,), "layers.1.bias": (c4,), "layers.2.weight": (h, c4),
                           "layers.2.bias": (h,), "layers.4.weight": (h, h), "layers.4.bias": (h,)}, what, proj)


def load_vila(path: Path, template: ConvTemplate, device: torch.device, dtype: torch.dtype, weights: str,
              top_config: dict, quantization: tuple | None = None, strip_quant: bool = False) -> VilaAdapter:
    llm_kwargs, vision_kwargs = {}, {}
    if strip_quant:  # AWQ checkpoint: load everything else; the caller puts the int4 linears in
        llm_cfg = LlamaConfig.from_pretrained(path / "llm")
        if hasattr(llm_cfg, "quantization_config"):
            delattr(llm_cfg, "quantization_config")
        llm_kwargs["config"] = llm_cfg
    if quantization is not None:
        qc, include_vision = quantization
        llm_kwargs["quantization_config"] = copy.deepcopy(qc)
        llm_kwargs["quantization_config"].llm_int8_skip_modules = ["lm_head"]
        if include_vision:
            vision_kwargs["quantization_config"] = copy.deepcopy(qc)
            vision_kwargs["quantization_config"].llm_int8_skip_modules = []
    what = f"--model-path {path}"
    llm = pretrained(LlamaForCausalLM, path / "llm", what, check_keys=not strip_quant, dtype=dtype,
                     device_map={"": device}, **llm_kwargs)
    vision = pretrained(SiglipVisionModel, path / "vision_tower", what, dtype=dtype, device_map={"": device},
                        **vision_kwargs)
    proj_dir = path / "mm_projector"
    proj_cfg = read_json_object(proj_dir / "config.json", what)
    if proj_cfg.get("mm_projector_type") != "mlp_downsample":
        raise UsageError(f"{what}: mm_projector type {proj_cfg.get('mm_projector_type')!r} is not supported "
                         "(supported: mlp_downsample)")
    state = {}
    for file in sorted(proj_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    projector = mlp_downsample_projector(vision.config.hidden_size, llm.config.hidden_size)
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{what}: the projector weights in {proj_dir} do not match the model "
                         f"({' '.join(str(e).split())[:300]})") from None
    projector.to(device=device, dtype=dtype)
    model = VilaModel(llm, vision, projector, top_config).eval()
    tokenizer = tokenizer_from(path / "llm", what)
    image_processor = image_processor_from(path / "vision_tower", what)
    adapter = VilaAdapter(model, tokenizer, image_processor, template, weights, path.name)
    adapter.identity = str(path.resolve())
    return adapter


def vila_configs(preset, tokenizer) -> tuple[LlamaConfig, SiglipVisionConfig]:
    llm, vis = preset.llm, preset.vision
    llm_cfg = LlamaConfig(
        hidden_size=llm.hidden, intermediate_size=llm.mlp, num_hidden_layers=llm.layers,
        num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads, vocab_size=llm.vocab,
        max_position_embeddings=llm.max_pos, rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        tie_word_embeddings=llm.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vis_cfg = SiglipVisionConfig(
        hidden_size=vis.hidden, intermediate_size=vis.mlp, num_hidden_layers=vis.layers,
        num_attention_heads=vis.heads, image_size=vis.image_size, patch_size=vis.patch,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )
    return llm_cfg, vis_cfg


def vila_top_config(llm_cfg, vis_cfg, dtype) -> dict:
    return {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "image_aspect_ratio": "resize",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "mm_projector_type": "mlp_downsample",
        "model_dtype": str(dtype),
        "llm_cfg": llm_cfg.to_dict(),
        "vision_tower_cfg": vis_cfg.to_dict(),
        "mm_projector_cfg": {"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"},
    }


def siglip_image_processor(preset):
    from transformers import SiglipImageProcessor

    size = preset.vision.image_size
    return SiglipImageProcessor(size={"height": size, "width": size}, resample=3, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3)


def build_vila_model(preset, tokenizer, device, dtype) -> VilaModel:
    llm_cfg, vis_cfg = vila_configs(preset, tokenizer)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(llm_cfg, dtype=dtype)
        vision = SiglipVisionModel._from_config(vis_cfg, dtype=dtype)
        projector = mlp_downsample_projector(vis_cfg.hidden_size, llm_cfg.hidden_size).to(dtype=dtype)
    return VilaModel(llm, vision, projector, vila_top_config(llm_cfg, vis_cfg, dtype)).eval()


def save_vila(adapter: VilaAdapter, out: Path, max_shard_size: str | None = None) -> None:
    """VILA1.5's published layout; the LLM and the vision tower sharded with an index when their
    weights pass `max_shard_size` (e.g. "2GB"; None: transformers' default)."""
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model = adapter.model
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.top_config, indent=2, default=str))
    model.llm.save_pretrained(out / "llm", **shard)
    adapter.tokenizer.save_pretrained(out / "llm")
    model.vision_tower.save_pretrained(out / "vision_tower", **shard)
    adapter.image_processor.save_pretrained(out / "vision_tower")
    proj_dir = out / "mm_projector"
    proj_dir.mkdir(exist_ok=True)
    (proj_dir / "config.json").write_text(json.dumps(model.top_config["mm_projector_cfg"], indent=2))
    state = {f"layers.{k}": v.detach().contiguous().cpu() for k, v in model.mm_projector.state_dict().items()}
    save_file(state, str(proj_dir / "model.safetensors"))


def build_vila(preset, tokenizer, template: ConvTemplate, device, dtype, max_tiles: int) -> VilaAdapter:
    model = build_vila_model(preset, tokenizer, device, dtype)
    model.top_config[RANDOM_WEIGHTS_MARK] = True
    return VilaAdapter(model, tokenizer, siglip_image_processor(preset), template, "random", preset.name)


FAMILY = Family(
    name="vila", layout="VILA1.5 (llm/, vision_tower/, mm_projector/)", default_conv_mode="vicuna_v1",
    detect=is_vila_dir,
    load=lambda path, config, template, device, dtype, weights, quantization, strip_quant, max_tiles: load_vila(
        path, template, device, dtype, weights, config, quantization, strip_quant),
    build=build_vila, save=save_vila, llm_dir="llm", check=check_vila,
    text_config=lambda path: LlamaConfig.from_pretrained(path / "llm"),
    architectures=("LlavaLlamaModel", "LlavaLlamaForCausalLM"),
)

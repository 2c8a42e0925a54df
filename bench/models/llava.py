"""LLaVA-1.5 in the llava-hf layout, on transformers' LlavaForConditionalGeneration."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from bench.models.base import PreparedPrompt, prepare_by_placeholders
from bench.models.family import RANDOM_WEIGHTS_MARK, Family
from bench.models.native import NativeVLMAdapter, load_native, native_checker, native_text_config, save_native
from bench.models.templates import IMAGE_PLACEHOLDER, ConvTemplate


class LlavaAdapter(NativeVLMAdapter):
    family = "llava"
    image_separator = "\n"  # LLaVA: "<image>\n{question}"

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer, image_processor, template: ConvTemplate,
                 weights: str, name: str):
        super().__init__(template)
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.weights, self.name = weights, name
        cfg = model.config
        self.image_token_id = cfg.image_token_index
        self.feature_layer = cfg.vision_feature_layer
        self.select_strategy = cfg.vision_feature_select_strategy
        v = cfg.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        self.image_tokens = patches + 1 if self.select_strategy == "full" else patches

    # CPU ---------------------------------------------------------------------------------
    def prepare_text(self, question: str, visual=None) -> PreparedPrompt:
        n = self.image_count(visual)
        block = (IMAGE_PLACEHOLDER + self.image_separator) * n
        return prepare_by_placeholders(self, question, block, IMAGE_PLACEHOLDER, self.image_token_id, [self.image_tokens] * n)

    # device ------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # Same computation as LlavaModel.get_image_features, written against the stable module
        # attributes because that method's return type changed across transformers 5.x.
        out = self.model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.feature_layer]
        if self.select_strategy == "default":
            feats = feats[:, 1:]
        feats = self.model.model.multi_modal_projector(feats).to(self.dtype)
        return feats.reshape(1, -1, feats.shape[-1])  # several images: their tokens in order


def is_llava_dir(path: Path, config: dict) -> bool:
    return config.get("model_type") == "llava" and "llm_cfg" not in config and not (path / "llm").is_dir()


def load_llava(path: Path, template: ConvTemplate, device: torch.device, dtype: torch.dtype, weights: str,
               quantization: tuple | None = None, strip_quant: bool = False) -> LlavaAdapter:
    model, _, tokenizer, image_processor = load_native(LlavaForConditionalGeneration, LlavaConfig, path, device,
                                                       dtype, quantization, strip_quant)
    adapter = LlavaAdapter(model, tokenizer, image_processor, template, weights, path.name)
    adapter.identity = str(path.resolve())
    return adapter


def llava_config(preset, tokenizer) -> LlavaConfig:
    llm, vis = preset.llm, preset.vision
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    pad = tokenizer.convert_tokens_to_ids("<pad>")
    return LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=vis.hidden, intermediate_size=vis.mlp,
            num_hidden_layers=vis.layers, num_attention_heads=vis.heads, image_size=vis.image_size,
            patch_size=vis.patch, projection_dim=768 if vis.hidden >= 768 else vis.hidden,
            hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        text_config=dict(
            model_type="llama", hidden_size=llm.hidden, intermediate_size=llm.mlp,
            num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
            vocab_size=llm.vocab, max_position_embeddings=llm.max_pos, rms_norm_eps=llm.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
            tie_word_embeddings=llm.tie_embeddings, pad_token_id=pad, bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=image_token,
        image_seq_length=(vis.image_size // vis.patch) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=pad,
        tie_word_embeddings=llm.tie_embeddings,
    )


def llava_image_processor(preset):
    from transformers import CLIPImageProcessor

    size = preset.vision.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )


def build_llava_model(preset, tokenizer, device, dtype) -> LlavaForConditionalGeneration:
    config = llava_config(preset, tokenizer)
    with torch.device(device):
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()


def build_llava(preset, tokenizer, template: ConvTemplate, device, dtype, max_tiles: int) -> LlavaAdapter:
    model = build_llava_model(preset, tokenizer, device, dtype)
    model.config.__dict__[RANDOM_WEIGHTS_MARK] = True
    return LlavaAdapter(model, tokenizer, llava_image_processor(preset), template, "random", preset.name)


FAMILY = Family(
    name="llava", layout="llava-hf layout", default_conv_mode="vicuna_v1", detect=is_llava_dir,
    load=lambda path, config, template, device, dtype, weights, quantization, strip_quant, max_tiles: load_llava(
        path, template, device, dtype, weights, quantization, strip_quant),
    build=build_llava, save=save_native, llm_key="language_model.", 
    check=native_checker(LlavaForConditionalGeneration, LlavaConfig, IMAGE_PLACEHOLDER),
    text_config=native_text_config(LlavaConfig),
    architectures=("LlavaForConditionalGeneration",),
)

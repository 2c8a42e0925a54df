"""What LLaVA and InternVL share as transformers-native VLM classes (…ForConditionalGeneration):
the same module tree (model.language_model, model.vision_tower, model.multi_modal_projector,
lm_head), the same forward over embeddings, and the same from_pretrained load (with AutoAWQ's
quantization_config stripped, or a bitsandbytes config that keeps lm_head and vision in dtype)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from bench.models.base import VLMAdapter

VISION_MODULES = ["model.vision_tower", "model.multi_modal_projector"]


class NativeVLMAdapter(VLMAdapter):
    """Adapter base for a transformers-native VLM; subclasses add prompt layout and image features."""

    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def vision_modules(self) -> list[torch.nn.Module]:
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    def text_config(self):
        return self.model.config.get_text_config(decoder=True)

    def quantization_targets(self, include_vision: bool) -> list[torch.nn.Module]:
        # The decoder stack only: lm_head stays in dtype.
        return [self.model.model.language_model] + (self.vision_modules() if include_vision else [])

    def find_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    def decoder_parts(self):
        return self.model.model.language_model, self.model.lm_head

    def lm_forward(self, inputs_embeds: torch.Tensor, cache, logits_to_keep: int = 1, attention_mask=None,
                   position_ids=None) -> torch.Tensor:
        out = self.model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True,
                         logits_to_keep=logits_to_keep, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits


def load_native(model_cls, config_cls, path: Path, device: torch.device, dtype: torch.dtype,
                quantization: tuple | None = None, strip_quant: bool = False):
    """(model, config, tokenizer, image processor) from a checkpoint directory in the -hf layout."""
    config = config_cls.from_pretrained(path)
    kwargs = {}
    if strip_quant:  # AWQ checkpoint: load everything else; the caller puts the int4 linears in
        for cfg in (config, config.get_text_config()):
            if hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
        kwargs["config"] = config
    if quantization is not None:
        qc, include_vision = copy.deepcopy(quantization[0]), quantization[1]
        # lm_head stays in dtype; vision tower and projector too unless asked for.
        qc.llm_int8_skip_modules = ["lm_head"] + ([] if include_vision else VISION_MODULES)
        kwargs["quantization_config"] = qc
    model = model_cls.from_pretrained(path, dtype=dtype, device_map={"": device}, use_safetensors=True,
                                      **kwargs).eval()
    return model, config, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def save_native(adapter: NativeVLMAdapter, out: Path) -> None:
    """The -hf layout: model (safetensors), tokenizer and image processor in one directory."""
    adapter.model.save_pretrained(out)
    adapter.tokenizer.save_pretrained(out)
    adapter.image_processor.save_pretrained(out)

"""Find and load a model: a checkpoint directory (LLaVA llava-hf or VILA1.5 layout) or a preset."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.errors import UsageError
from bench.models.base import VLMAdapter
from bench.models.internvl import (
    InternVLAdapter, build_internvl_model, internvl_image_processor, is_internvl_dir, load_internvl,
)
from bench.models.llava import (
    LlavaAdapter, build_llava_model, is_llava_dir, llava_image_processor, load_llava,
)
from bench.models.native import save_native
from bench.models.presets import Preset, get_preset
from bench.models.tokenizer import build_tokenizer
from bench.models.vila import VilaAdapter, build_vila_model, is_vila_dir, load_vila, save_vila, siglip_image_processor
from bench.models.templates import TEMPLATE_SPECIAL_TOKENS, get_template

# Written into checkpoints made from presets, so loading one still says weights=random.
RANDOM_WEIGHTS_MARK = "bench_random_weights"

DEFAULT_CONV_MODE = {"llava": "vicuna_v1", "vila": "vicuna_v1", "internvl": "internvl2_5"}
LAYOUTS = "llava-hf layout, InternVL -hf layout, or VILA1.5 (llm/, vision_tower/, mm_projector/)"


def read_checkpoint_config(path: Path) -> tuple[str, dict]:
    """(family, top-level config) or a UsageError saying what the directory lacks."""
    if not path.is_dir():
        raise UsageError(f"--model-path {path} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"--model-path {path} is not a LLaVA/VILA/InternVL checkpoint: no config.json "
                         f"(expected {LAYOUTS})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--model-path {path}: config.json is not valid JSON ({e})") from None
    if is_vila_dir(path, config):
        return "vila", config
    for family, matches in (("llava", is_llava_dir), ("internvl", is_internvl_dir)):
        if matches(path, config):
            if not any(path.glob("*.safetensors")):
                raise UsageError(f"--model-path {path}: no *.safetensors weights (only safetensors are loaded)")
            return family, config
    raise UsageError(
        f"--model-path {path} is not a LLaVA/VILA/InternVL checkpoint (model_type={config.get('model_type')!r}); "
        f"supported: {LAYOUTS}"
    )


def awq_quantization(path: Path, family: str, config: dict) -> dict | None:
    """The checkpoint's AutoAWQ quantization_config (None: not pre-quantized)."""
    from bench.quant.awq_format import check_awq_config

    qc = config.get("quantization_config")
    if qc is None and family == "vila" and (path / "llm" / "config.json").is_file():
        qc = json.loads((path / "llm" / "config.json").read_text()).get("quantization_config")
    if not qc or str(qc.get("quant_method", "")).lower() != "awq":
        return None
    try:
        check_awq_config(qc)
    except ValueError as e:
        raise UsageError(f"--model-path {path}: {e}") from None
    return qc


def load_checkpoint(path: Path, conv_mode: str | None, device: torch.device, dtype: torch.dtype,
                    quantization: tuple | None = None, max_tiles: int = 12) -> VLMAdapter:
    family, config = read_checkpoint_config(path)
    weights = "random" if config.get(RANDOM_WEIGHTS_MARK) else "checkpoint"
    template = get_template(conv_mode or DEFAULT_CONV_MODE[family])
    awq = awq_quantization(path, family, config)
    if family == "vila":
        adapter = load_vila(path, template, device, dtype, weights, config, quantization, strip_quant=awq is not None)
    elif family == "internvl":
        adapter = load_internvl(path, template, device, dtype, weights, quantization, strip_quant=awq is not None,
                                max_tiles=max_tiles)
    else:
        adapter = load_llava(path, template, device, dtype, weights, quantization, strip_quant=awq is not None)
    if awq is not None:
        load_awq_checkpoint(adapter, path, family, awq)
    return adapter


def load_awq_checkpoint(adapter: VLMAdapter, path: Path, family: str, qc: dict) -> None:
    """Replace the decoder's linears (loaded without weights) by the checkpoint's AWQ int4 ones."""
    from bench.quant import DEFAULT_DENSE_ROWS
    from bench.quant.awq_format import check_awq_config
    from bench.quant.store import checkpoint_awq_tensors, load_int4_tensors

    if family == "vila":
        files, keep = sorted((path / "llm").glob("*.safetensors")), (lambda k: True)
    else:  # llava-hf / InternVL-hf: only the language model's keys ("language_model." in either naming)
        files, keep = sorted(path.glob("*.safetensors")), (lambda k: "language_model." in k)
    tensors, stored = checkpoint_awq_tensors(files, keep)
    if not tensors:
        raise UsageError(f"--model-path {path}: quantization_config says AWQ but no qweight/qzeros/scales tensors")
    load_int4_tensors(adapter, tensors, check_awq_config(qc), dense_rows=DEFAULT_DENSE_ROWS, strict=False)
    # A decoder linear that is neither int4 nor stored in full would be left randomly initialised.
    root = adapter.quantization_targets(False)[0]
    absent = [n for n, m in root.named_modules() if type(m) is torch.nn.Linear and f"{n}.weight" not in stored]
    if absent:
        raise UsageError(f"--model-path {path}: AWQ checkpoint has neither int4 nor full weights for {absent[:3]}")


def build_preset(name: str, conv_mode: str | None, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, max_tiles: int = 12) -> VLMAdapter:
    """Random weights, created directly on `device` (a 7B model never passes through CPU memory)."""
    preset: Preset = get_preset(name)
    template = get_template(conv_mode or preset.conv_mode)
    if preset.qwen_tokenizer:
        tokenizer = build_tokenizer(preset.tokenizer_base_vocab, list(preset.special_tokens), qwen=True)
    else:
        tokenizer = build_tokenizer(preset.tokenizer_base_vocab, list(preset.special_tokens) + TEMPLATE_SPECIAL_TOKENS)
    if len(tokenizer) > preset.llm.vocab:
        raise ValueError(f"tokenizer ({len(tokenizer)}) larger than the preset's vocab ({preset.llm.vocab})")
    torch.manual_seed(seed)
    if preset.family == "llava":
        model = build_llava_model(preset, tokenizer, device, dtype)
        model.config.__dict__[RANDOM_WEIGHTS_MARK] = True
        adapter = LlavaAdapter(model, tokenizer, llava_image_processor(preset), template, "random", name)
    elif preset.family == "internvl":
        model = build_internvl_model(preset, tokenizer, device, dtype)
        model.config.__dict__[RANDOM_WEIGHTS_MARK] = True
        adapter = InternVLAdapter(model, tokenizer, internvl_image_processor(preset, max_tiles), template, "random",
                                  name, max_tiles)
    else:
        model = build_vila_model(preset, tokenizer, device, dtype)
        model.top_config[RANDOM_WEIGHTS_MARK] = True
        adapter = VilaAdapter(model, tokenizer, siglip_image_processor(preset), template, "random", name)
    adapter.identity = f"preset:{name}:seed{seed}"
    return adapter


def save_checkpoint(adapter: VLMAdapter, out: Path) -> None:
    """Write the model in its family's real on-disk layout (safetensors)."""
    if isinstance(adapter, VilaAdapter):
        save_vila(adapter, out)
    else:  # LLaVA and InternVL: the -hf layout
        save_native(adapter, out)

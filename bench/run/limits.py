"""Sizes that can never run, refused before any model loads: a prompt (question, image tokens
and new tokens) longer than the model's positions, and a batch whose KV cache alone exceeds
the device's memory. The model's dimensions come from its preset or its config.json."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.errors import UsageError
from bench.models.presets import PRESETS


@dataclass(frozen=True)
class ModelDims:
    max_pos: int | None  # positions the language model was built for (None: not known before loading)
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    image_tokens: int = 1  # a lower bound on the tokens one image adds to the prompt


def _llm_config(path: Path, config: dict) -> dict:
    """The language model's part of a checkpoint's config (llava text_config, InternVL
    llm_config, VILA llm/config.json), else the top level."""
    for key in ("text_config", "llm_config"):
        if isinstance(config.get(key), dict):
            return config[key]
    llm = path / "llm" / "config.json"
    if llm.is_file():
        try:
            return json.loads(llm.read_text())
        except (OSError, ValueError):
            return {}
    return config


def model_dims(model_path: str | None, preset: str | None) -> ModelDims:
    if not model_path:
        p = PRESETS[preset]
        llm, side = p.llm, p.vision.image_size // p.vision.patch
        return ModelDims(llm.max_pos, llm.layers, llm.kv_heads, llm.hidden // llm.heads, max(1, (side // 2) ** 2))
    path = Path(model_path)
    try:
        config = json.loads((path / "config.json").read_text())
        llm = _llm_config(path, config)
    except (OSError, ValueError):
        return ModelDims(None)

    def whole(key):
        v = llm.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    heads, hidden = whole("num_attention_heads"), whole("hidden_size")
    head_dim = whole("head_dim") or (hidden // heads if heads and hidden else None)
    return ModelDims(whole("max_position_embeddings"), whole("num_hidden_layers"),
                     whole("num_key_value_heads") or heads, head_dim)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device (CUDA), or the host's available memory (CPU)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_sizes(cfg, dims: ModelDims, model: str, questions: list[str], frames, device: torch.device,
                dtype: torch.dtype) -> None:
    """UsageError naming the flag when a workload point cannot fit the model's positions or the
    device's memory (lower bounds: a question has at least one token per word)."""
    words = max((len(q.split()) for q in questions), default=0)
    text_flag = (f"--questions {cfg.questions}" if cfg.questions else "--text-prompt" if cfg.text_prompt
                 else "the built-in questions")
    if frames is not None and cfg.video_mode == "clip":
        images_per_request, image_flag = len(frames), "--num-frames"
    else:
        images_per_request, image_flag = None, "--num-images"
    for p in cfg.points:
        images = images_per_request if images_per_request is not None else p.num_images
        question = p.question_tokens or words
        image_tokens = images * dims.image_tokens
        total = question + image_tokens + p.new_tokens
        if dims.max_pos is not None and total > dims.max_pos:
            new_flag = "--new-tokens" if cfg.new_tokens else "--max-new-tokens"
            parts = {new_flag: p.new_tokens, "--prompt-lengths" if p.question_tokens else text_flag: question,
                     image_flag: image_tokens}
            flag = max(parts, key=parts.get)
            raise UsageError(f"{flag}: the request needs at least {total:,} positions ({question:,} question tokens"
                             f" + {image_tokens:,} image tokens + {p.new_tokens:,} new tokens) but {model} has "
                             f"{dims.max_pos:,}; lower {flag}")
        if dims.layers and dims.kv_heads and dims.head_dim:
            need = 2 * dims.layers * dims.kv_heads * dims.head_dim * total * p.batch_size * dtype.itemsize
            have = available_bytes(device)
            if have is not None and need > have:
                raise UsageError(f"--batch-size {p.batch_size}: the KV cache alone needs {_gib(need)} ({total:,} "
                                 f"tokens x batch {p.batch_size:,}) but {device} has {_gib(have)} available; "
                                 "lower --batch-size")


def loaded_max_pos(model) -> int | None:
    """The loaded language model's positions (for checkpoints whose config.json does not say):
    the first module config that has max_position_embeddings (a wrapper's text config, or the
    language model inside a family's own wrapper module)."""
    if model is None:
        return None
    for module in model.modules():
        config = getattr(module, "config", None)
        candidates = [config, getattr(config, "llm_config", None)]
        if hasattr(config, "get_text_config"):
            candidates.insert(0, config.get_text_config())
        for c in candidates:
            v = getattr(c, "max_position_embeddings", None)
            if isinstance(v, int) and v > 0:
                return v
    return None

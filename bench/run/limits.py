"""Sizes that can never run, refused before any measured run: a prompt (text, image tokens and
new tokens) longer than the model's positions, and a batch whose KV cache alone exceeds the
device's memory. Before any model loads, from lower bounds (`check_sizes`; the model's
dimensions from its preset, or its checkpoint's config read as loading reads it); once the
tokenizer is loaded, on every workload point's prompts tokenized exactly (`check_prompt`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.errors import UsageError
from bench.models.presets import PRESETS
from bench.models.visual import group_refusal


# No tokenizer the harness loads has a token of more characters (LLaMA's and Qwen2's longest are
# runs of spaces or dashes of a few dozen): a lower bound on a text's tokens that holds for any.
MAX_TOKEN_CHARS = 256


@dataclass(frozen=True)
class ModelDims:
    max_pos: int | None  # positions the language model was built for (None: not known before loading)
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    image_tokens: int = 1  # a lower bound on the tokens one image adds to the prompt
    visual_group: int = 1  # a request shows a multiple of this many images or frames (bench.models.family)


def model_dims(model_path: str | None, preset: str | None) -> ModelDims:
    from bench.models.registry import get_family

    if not model_path:
        p = PRESETS[preset]
        llm, side = p.llm, p.vision.image_size // p.vision.patch
        return ModelDims(llm.max_pos, llm.layers, llm.kv_heads, llm.hidden // llm.heads, max(1, (side // 2) ** 2),
                         get_family(p.family).visual_group(None))
    from bench.models.loader import checkpoint_text_config, read_checkpoint_config

    family, config = read_checkpoint_config(Path(model_path))
    text = checkpoint_text_config(Path(model_path))

    def whole(key):
        v = getattr(text, key, None)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    heads, hidden = whole("num_attention_heads"), whole("hidden_size")
    head_dim = whole("head_dim") or (hidden // heads if heads and hidden else None)
    return ModelDims(whole("max_position_embeddings"), whole("num_hidden_layers"),
                     whole("num_key_value_heads") or heads, head_dim,
                     visual_group=get_family(family).visual_group(config))


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


def _flags(cfg, point, frames) -> tuple[str, str, str]:
    """The flags that set a request's new tokens, text and image tokens (named in refusals)."""
    new_flag = "--new-tokens" if cfg.new_tokens else "--max-new-tokens"
    text_flag = ("--prompt-lengths" if point.question_tokens else f"--questions {cfg.questions}" if cfg.questions
                 else "--text-prompt" if cfg.text_prompt else "the built-in questions")
    image_flag = "--num-frames" if frames is not None and cfg.video_mode == "clip" else "--num-images"
    return new_flag, text_flag, image_flag


def _check_point(cfg, dims: ModelDims, model: str, point, text: int, image: int, frames, device: torch.device,
                 dtype: torch.dtype, exact: bool, new_flag: str | None = None, batch_flag: str = "--batch-size") -> None:
    """A usage error naming the largest part when `text` + `image` tokens and the point's new
    tokens exceed the model's positions, or their KV cache at the point's batch the device."""
    total = text + image + point.new_tokens
    flags = _flags(cfg, point, frames)
    new_flag, text_flag, image_flag = new_flag or flags[0], flags[1], flags[2]
    words = ("text tokens", "needs") if exact else ("question tokens", "needs at least")
    if dims.max_pos is not None and total > dims.max_pos:
        parts = {new_flag: point.new_tokens, text_flag: text, image_flag: image}
        flag = max(parts, key=parts.get)
        if flag.startswith("--questions "):
            advice = "give shorter questions in it"
        elif flag == "--text-prompt":
            advice = "give a shorter question"
        elif flag.startswith("--"):
            advice = f"lower {flag}"
        else:  # the built-in questions
            advice = "give a shorter question with --text-prompt"
        raise UsageError(f"{flag}: the request {words[1]} {total:,} positions ({text:,} {words[0]} + {image:,} "
                         f"image tokens + {point.new_tokens:,} new tokens) but {model} has {dims.max_pos:,}; "
                         f"{advice}")
    if dims.layers and dims.kv_heads and dims.head_dim:
        need = 2 * dims.layers * dims.kv_heads * dims.head_dim * total * point.batch_size * dtype.itemsize
        have = available_bytes(device)
        if have is not None and need > have:
            raise UsageError(f"{batch_flag} {point.batch_size}: the KV cache alone needs {_gib(need)} ({total:,} "
                             f"tokens x batch {point.batch_size:,}) but {device} has {_gib(have)} available; "
                             f"lower {batch_flag}")


def check_sizes(cfg, dims: ModelDims, model: str, questions: list[str], frames, device: torch.device,
                dtype: torch.dtype) -> None:
    """UsageError naming the flag when a workload point cannot fit the model's positions or the
    device's memory (lower bounds: a question has at least one token per word, and one per
    MAX_TOKEN_CHARS characters), before any tokenizer or model loads."""
    words = max((max(len(q.split()), -(-len(q) // MAX_TOKEN_CHARS)) for q in questions), default=0)
    images_per_request = len(frames) if frames is not None and cfg.video_mode == "clip" else None
    for p in cfg.points:
        images = images_per_request if images_per_request is not None else p.num_images
        shown = 1 if frames is not None and cfg.video_mode != "clip" else images  # --video-mode frames: one each
        if shown % dims.visual_group:
            raise UsageError(group_refusal(model, dims.visual_group, shown))
        _check_point(cfg, dims, model, p, p.question_tokens or words, images * dims.image_tokens, frames, device,
                     dtype, exact=False)


def check_prompt(cfg, dims: ModelDims, model: str, point, prepared, frames, device: torch.device,
                 dtype: torch.dtype, new_flag: str | None = None, batch_flag: str = "--batch-size") -> None:
    """check_sizes for one workload point's longest prompt as the adapter tokenized it (a
    bench.models.base.PreparedPrompt: its prefix with the image tokens, and its suffix);
    `new_flag` / `batch_flag`: the flags that set the point's new tokens and batch, where not
    the sweep's (serve: --max-new-tokens, --max-batch)."""
    image = prepared.total_image_tokens
    _check_point(cfg, dims, model, point, prepared.prompt_tokens - image, image, frames, device, dtype,
                 exact=True, new_flag=new_flag, batch_flag=batch_flag)


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

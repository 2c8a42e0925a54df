"""Find and load a model: a checkpoint directory in one of the known families' layouts
(bench.models.registry), or a preset. Nothing here names a family."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from bench.errors import UsageError
from bench.models.base import VLMAdapter
from bench.models.family import DEFAULT_MAX_TILES, RANDOM_WEIGHTS_MARK
from bench.models.files import check_architectures, check_config_values, one_line, read_json_object
from bench.models.presets import Preset, get_preset
from bench.models.registry import families, get_family, layouts
from bench.models.templates import TEMPLATE_SPECIAL_TOKENS, get_template
from bench.models.tokenizer import build_tokenizer


# Directories that passed their family's check, by their files' (path, size, mtime) and the
# families registered: a run checks once, not at every load; a changed directory (or registry) is
# checked again.
_CHECKED: dict[tuple, tuple[str, dict]] = {}


def _files_state(path: Path) -> tuple:
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file())


def read_checkpoint_config(path: Path) -> tuple[str, dict]:
    """(family, top-level config) or a UsageError saying what the directory lacks or what is
    broken in it (the family's check runs before anything loads)."""
    if path.is_dir():
        state = (str(path.resolve()), _files_state(path), tuple((n, id(f)) for n, f in families().items()))
        if state in _CHECKED:
            family, config = _CHECKED[state]
            return family, copy.deepcopy(config)
        family, config = _read_checkpoint_config(path)
        _CHECKED[state] = (family, copy.deepcopy(config))
        return family, config
    return _read_checkpoint_config(path)


def _read_checkpoint_config(path: Path) -> tuple[str, dict]:
    if not path.is_dir():
        raise UsageError(f"--model-path {path} is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"--model-path {path} is not a checkpoint of a supported model: no config.json "
                         f"(expected {layouts()})")
    what = f"--model-path {path}"
    config = read_json_object(cfg_file, what)
    for part in [cfg_file, *sorted(path.glob("*/config.json"))]:  # VILA's llm/, vision_tower/, mm_projector/
        check_config_values(config if part == cfg_file else read_json_object(part, what), what, part)
    for family in families().values():
        if family.detect(path, config):
            check_architectures(config, family.architectures, family.layout, what, cfg_file)
            if family.check is not None:
                family.check(path, config)
            elif not family.llm_files(path)[0]:
                raise UsageError(f"--model-path {path}: no *.safetensors weights (only safetensors are loaded)")
            return family.name, config
    raise UsageError(
        f"--model-path {path} is not a checkpoint of a supported model (model_type={config.get('model_type')!r}); "
        f"supported: {layouts()}"
    )


def checkpoint_text_config(path: Path):
    """The checkpoint's language-model config as loading reads it, without loading weights (None:
    its family cannot say, or transformers cannot read it; the family's check has run first)."""
    family, _ = read_checkpoint_config(path)
    read = get_family(family).text_config
    if read is None:
        return None
    try:
        return read(path)
    except Exception:  # noqa: BLE001 - transformers' config validation raises many error types
        return None


def awq_quantization(path: Path, family: str, config: dict) -> dict | None:
    """The checkpoint's AutoAWQ quantization_config (None: not pre-quantized)."""
    from bench.quant.awq_format import check_awq_config

    qc = config.get("quantization_config")
    llm_config = path / get_family(family).llm_dir / "config.json"
    if qc is None and get_family(family).llm_dir and llm_config.is_file():
        qc = read_json_object(llm_config, f"--model-path {path}").get("quantization_config")
    if not qc or str(qc.get("quant_method", "")).lower() != "awq":
        return None
    try:
        check_awq_config(qc)
    except ValueError as e:
        raise UsageError(f"--model-path {path}: {e}") from None
    return qc


def load_checkpoint(path: Path, conv_mode: str | None, device: torch.device, dtype: torch.dtype,
                    quantization: tuple | None = None, max_tiles: int = DEFAULT_MAX_TILES) -> VLMAdapter:
    family, config = read_checkpoint_config(path)
    weights = "random" if config.get(RANDOM_WEIGHTS_MARK) else "checkpoint"
    spec = get_family(family)
    template = get_template(conv_mode or spec.default_conv_mode)
    awq = awq_quantization(path, family, config)
    adapter = spec.load(path, config, template, device, dtype, weights, quantization, awq is not None, max_tiles)
    if awq is not None:
        load_awq_checkpoint(adapter, path, family, awq)
    check_finite(adapter.model, f"--model-path {path}")
    return adapter


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Every floating-point weight the checkpoint loaded is finite: a NaN or infinite value (a
    corrupt download or a diverged training run) makes every measured output garbage."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
                raise UsageError(f"{what}: tensor {name!r} holds NaN or infinite values; the checkpoint is corrupt "
                                 "(re-download it)")


def load_awq_checkpoint(adapter: VLMAdapter, path: Path, family: str, qc: dict) -> None:
    """Replace the decoder's linears (loaded without weights) by the checkpoint's AWQ int4 ones."""
    from bench.quant import DEFAULT_DENSE_ROWS
    from bench.quant.awq_format import check_awq_config
    from bench.quant.store import checkpoint_awq_tensors, load_int4_tensors

    files, keep = get_family(family).llm_files(path)
    tensors, stored = checkpoint_awq_tensors(files, keep)
    if not tensors:
        raise UsageError(f"--model-path {path}: quantization_config says AWQ but no qweight/qzeros/scales tensors")
    try:
        load_int4_tensors(adapter, tensors, check_awq_config(qc), dense_rows=DEFAULT_DENSE_ROWS, strict=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"--model-path {path}: the AWQ int4 tensors do not fit the model ({one_line(e)}); "
                         "re-download or re-quantize the checkpoint") from None
    # A decoder linear that is neither int4 nor stored in full would be left randomly initialised.
    root = adapter.quantization_targets(False)[0]
    absent = [n for n, m in root.named_modules() if type(m) is torch.nn.Linear and f"{n}.weight" not in stored]
    if absent:
        raise UsageError(f"--model-path {path}: AWQ checkpoint has neither int4 nor full weights for {absent[:3]}")


def build_preset(name: str, conv_mode: str | None, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, max_tiles: int = DEFAULT_MAX_TILES) -> VLMAdapter:
    """Random weights, created directly on `device` (a 7B model never passes through CPU memory)."""
    preset: Preset = get_preset(name)
    template = get_template(conv_mode or preset.conv_mode)
    if preset.qwen_tokenizer:
        tokenizer = build_tokenizer(preset.tokenizer_base_vocab, list(preset.special_tokens), qwen=True)
    else:
        extra = TEMPLATE_SPECIAL_TOKENS if preset.template_tokens else []
        tokenizer = build_tokenizer(preset.tokenizer_base_vocab, list(preset.special_tokens) + extra)
    if len(tokenizer) > preset.llm.vocab:
        raise ValueError(f"tokenizer ({len(tokenizer)}) larger than the preset's vocab ({preset.llm.vocab})")
    torch.manual_seed(seed)
    adapter = get_family(preset.family).build(preset, tokenizer, template, device, dtype, max_tiles)
    adapter.identity = f"preset:{name}:seed{seed}"
    return adapter


def save_checkpoint(adapter: VLMAdapter, out: Path, max_shard_size: str | None = None) -> None:
    """Write the model in its family's real on-disk layout (safetensors; shards of at most
    `max_shard_size` with an index, as published checkpoints are)."""
    get_family(adapter.family).save(adapter, out, max_shard_size)

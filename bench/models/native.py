"""What LLaVA and InternVL share as transformers-native VLM classes (…ForConditionalGeneration):
the same module tree (model.language_model, model.vision_tower, model.multi_modal_projector,
lm_head), the same forward over embeddings, and the same from_pretrained load (with AutoAWQ's
quantization_config stripped, or a bitsandbytes config that keeps lm_head and vision in dtype)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from bench.errors import UsageError
from bench.models.base import VLMAdapter
from bench.models.cache_arg import cache_arg
from bench.models.files import (check_awq_tensors, check_feature_layer, check_layer_counts, check_shapes,
                                checked_weights, one_line, require_preprocessor, require_tokenizer)

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
        out = self.model(inputs_embeds=inputs_embeds, **cache_arg(self.model, cache), use_cache=True,
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
    model = pretrained(model_cls, path, f"--model-path {path}", check_keys=not strip_quant, dtype=dtype,
                       device_map={"": device}, **kwargs).eval()
    return model, config, tokenizer_from(path, f"--model-path {path}"), image_processor_from(path, f"--model-path {path}")


def native_text_config(config_cls):
    """text_config(path) for a -hf layout: the language model's part of the config load_native reads."""
    return lambda path: config_cls.from_pretrained(path).get_text_config(decoder=True)


def native_checker(model_cls, config_cls, placeholder: str, adjust=None):
    """check(path, config) for a -hf layout: before loading, the weights are whole safetensors
    (headers, shards) holding every tensor the config implies, in its shape; the tokenizer and the
    image processor config are there, and the tokenizer gives the image `placeholder` the
    prompts hold the config's image token id."""

    def check(path: Path, config: dict) -> None:
        what = f"--model-path {path}"
        tensors = checked_weights(path, what)
        require_tokenizer(path, what)
        require_preprocessor(path, what)
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq":
            check_awq_tensors(tensors, int(qc.get("group_size", qc.get("q_group_size", 128)) or 0), what, path)
        elif not qc:
            check_shapes(tensors, expected_tensors(model_cls, config_cls, path, what, set(tensors), adjust), what, path)
        if "vision_feature_layer" in config:
            check_feature_layer(config["vision_feature_layer"],
                                (config.get("vision_config") or {}).get("num_hidden_layers"),
                                "vision_feature_layer", what, path)
        tokenizer = tokenizer_from(path, what)  # loads (no code runs): a broken file is an error before the run starts
        check_image_token(config, config_cls().image_token_id, tokenizer, placeholder, what, path)
        image_processor_from(path, what)

    return check


def check_image_token(config: dict, default: int, tokenizer, placeholder: str, what: str, path: Path) -> None:
    """The image placeholder's id (the config class's `default` where config.json gives none) is a
    token of the language model's vocabulary (one past it makes every request fail at its
    embedding lookup), and the id the tokenizer gives `placeholder` (another id makes every
    request fail: no prompt holds the token the model puts the image at)."""
    token = config.get("image_token_id", config.get("image_token_index", default))
    if not isinstance(token, int):
        return  # a null or a string: the config class's validation names it
    vocab = (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int) and not 0 <= token < vocab:
        raise UsageError(f"{what}: {path / 'config.json'} gives the image token id {token}, outside the "
                         f"vocabulary of {vocab:,} tokens; restore the checkpoint's original file")
    found = tokenizer.convert_tokens_to_ids(placeholder)
    if found is None or found == tokenizer.unk_token_id:
        raise UsageError(f"{what}: the tokenizer has no {placeholder} token (the image placeholder); copy the "
                         "checkpoint's tokenizer files")
    if found != token:
        raise UsageError(f"{what}: {path / 'config.json'} gives the image token id {token}, but the tokenizer "
                         f"gives {placeholder} the id {found}; restore the checkpoint's original files")


def expected_tensors(model_cls, config_cls, path: Path, what: str, names: set[str],
                     adjust=None) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} the config implies (the model built on the meta device, then `adjust`ed
    as the family's load does), named as the
    files name them: transformers' current names or the legacy ones save_pretrained writes."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        config = config_cls.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers' config validation raises many error types
        raise UsageError(f"{what}: {path / 'config.json'} does not describe a model ({one_line(e)}); restore the "
                         "checkpoint's original file") from None
    check_layer_counts([config.get_text_config(), getattr(config, "vision_config", None)], names, what, path)
    try:
        with torch.device("meta"):
            model = model_cls._from_config(config)
        if adjust is not None:  # what the family's load changes in the module tree
            adjust(model, config)
    except Exception as e:  # noqa: BLE001 - transformers' config validation raises many error types
        raise UsageError(f"{what}: {path / 'config.json'} does not describe a model ({one_line(e)}); restore the "
                         "checkpoint's original file") from None
    state = model.state_dict()
    tied = {k for k in state if k.endswith("lm_head.weight")} if config.get_text_config().tie_word_embeddings else set()
    candidates = [{k: tuple(v.shape) for k, v in state.items() if k not in tied}]
    try:
        reverted = revert_weight_conversion(model, {k: v for k, v in state.items() if k not in tied})
        candidates.append({k: tuple(v.shape) for k, v in reverted.items()})
    except Exception:  # noqa: BLE001 - no reverse mapping for this model: current names only
        pass
    best = max(candidates, key=lambda c: len(names & set(c)))
    if len(names & set(best)) < len(best) // 2:
        return {k: v for k, v in best.items() if k in names}  # unfamiliar naming: shapes of what matches
    return best


def pretrained(model_cls, path: Path, what: str, check_keys: bool = True, **kwargs):
    """model_cls.from_pretrained from safetensors only, refusing weights whose shapes differ from
    the config and tensors the files lack (which would run on uninitialised weights)."""
    try:
        model, info = model_cls.from_pretrained(path, use_safetensors=True, output_loading_info=True, **kwargs)
    except (RuntimeError, ValueError, OSError) as e:
        first = one_line(e, 300)
        if "size mismatch" in str(e) or "shape" in str(e).lower():
            raise UsageError(f"{what}: weights in {path} do not match its config.json ({first})") from None
        raise UsageError(f"{what}: cannot load the model in {path} ({first})") from None
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        name = mismatched[0][0] if isinstance(mismatched[0], (tuple, list)) else mismatched[0]
        raise UsageError(f"{what}: tensor {name!r} in {path} has a shape the config.json does not imply; "
                         "the weights do not belong to this config")
    missing = sorted(info.get("missing_keys") or [])
    if check_keys and missing:
        raise UsageError(f"{what}: tensor {missing[0]!r} is missing from the weights in {path}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the checkpoint is "
                         "incomplete")
    unexpected = sorted(info.get("unexpected_keys") or [])  # less those the model class declares ignorable
    if check_keys and unexpected:
        raise UsageError(f"{what}: tensor {unexpected[0]!r} in {path} is not part of the model the config.json "
                         f"describes{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; the "
                         "weights do not belong to this config")
    return model


def tokenizer_from(folder: Path, what: str):
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise UsageError(f"{what}: cannot load the tokenizer in {folder} ({one_line(e)})") from None


def local_tokenizer(folder: Path, what: str):
    """A directory's tokenizer on its own (no model with it), its files checked as a checkpoint's."""
    if not folder.is_dir():
        raise UsageError(f"{what}: not a directory")
    require_tokenizer(folder, what)
    return tokenizer_from(folder, what)


def image_processor_from(folder: Path, what: str):
    try:
        try:
            return AutoImageProcessor.from_pretrained(folder)
        except ImportError:
            named = _named_image_processor(folder)
            if named is None:
                raise
            return named.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - as above
        raise UsageError(f"{what}: cannot load the image processor in {folder} ({one_line(e)})") from None


def _named_image_processor(folder: Path):
    """The transformers image processor class preprocessor_config.json names (its
    image_processor_type, a name transformers exports: never code from the checkpoint), or None.
    transformers 5.17 refuses AutoImageProcessor itself without torchvision, while the class it
    would pick falls back to its PIL version; later versions pick the PIL backend themselves."""
    import json

    import transformers
    from transformers.image_processing_utils import BaseImageProcessor

    try:
        name = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8")).get("image_processor_type")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name.isidentifier():
        return None
    cls = getattr(transformers, name.removesuffix("Fast"), None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseImageProcessor) else None


def save_native(adapter: NativeVLMAdapter, out: Path, max_shard_size: str | None = None) -> None:
    """The -hf layout: model (safetensors, sharded with model.safetensors.index.json when larger
    than `max_shard_size`, e.g. "5GB"; None: transformers' default), tokenizer and image
    processor in one directory."""
    adapter.model.save_pretrained(out, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    adapter.tokenizer.save_pretrained(out)
    adapter.image_processor.save_pretrained(out)

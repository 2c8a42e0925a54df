"""How a transformers model's forward takes its KV cache: `cache=` where its signature has it
(transformers 5.25: `past_key_values=` is deprecated there, to be removed in 5.40), else
`past_key_values=` (transformers 5.17). Looked up once per model class."""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _name(model_cls: type) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cache_arg(model, cache) -> dict:
    """The keyword argument that passes `cache` to `model`'s forward."""
    return {_name(type(model)): cache}

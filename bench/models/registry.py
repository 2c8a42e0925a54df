"""The model families the harness knows: one module each in bench/models, one line here.

A family module defines `FAMILY` (bench.models.family.Family); checkpoint directories are matched
against the families in this order (the first whose `detect` accepts it), and presets name theirs.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from bench.models.family import Family

_MODULES = [
    "bench.models.vila",      # VILA1.5: llm/ + vision_tower/ + mm_projector/ (checked first: its config may say llava)
    "bench.models.llava",     # LLaVA-1.5, llava-hf layout
    "bench.models.internvl",  # InternVL3 -hf layout
    "bench.models.internvideo",  # InternVideo2.5: InternVL remote-code layout with InternLM2
    "bench.models.vita",      # VITA-1.5: VITAQwen2ForCausalLM (Qwen2.5 + InternViT + mlp2x_gelu)
]


_EXTRA: list[Family] = []  # registered at run time (register), matched before the listed ones


@lru_cache(maxsize=None)
def _listed() -> tuple[Family, ...]:
    return tuple(importlib.import_module(m).FAMILY for m in _MODULES)


def families() -> dict[str, Family]:
    return {f.name: f for f in (*_EXTRA, *_listed())}


def register(family: Family) -> None:
    """Add a family without editing this file (a plug-in, or a test); replaces one of that name."""
    unregister(family.name)
    _EXTRA.insert(0, family)


def unregister(name: str) -> None:
    _EXTRA[:] = [f for f in _EXTRA if f.name != name]


def get_family(name: str) -> Family:
    try:
        return families()[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(families())}") from None


def layouts() -> str:
    """Every known layout, for messages about a directory that matches none."""
    return ", ".join(f.layout for f in families().values())

"""Variant registry: every part from every module listed here; specs compose parts with '+'."""
from __future__ import annotations

import importlib

from bench.errors import UsageError
from variants.base import (GraphEnginePart, GraphExactEnginePart, HFEnginePart, NoCachePart, Part, StaticEnginePart,
                           Variant)

_MODULES = ["variants.fp16", "variants.prefix", "variants.bnb", "variants.int4"]


def registry() -> dict[str, Part]:
    parts: dict[str, Part] = {p.name: p for p in (HFEnginePart(), StaticEnginePart(), GraphEnginePart(),
                                                  GraphExactEnginePart(), NoCachePart())}
    for mod in _MODULES:
        for p in importlib.import_module(mod).PARTS:
            parts[p.name] = p
    return parts


def parse_variant(spec: str) -> Variant:
    """'bnb4+prefix' -> Variant; weights default fp16, cache none, engine hf."""
    parts = registry()
    chosen: dict[str, Part] = {}
    names = [s.strip() for s in spec.split("+") if s.strip()]
    if not names:
        raise UsageError("empty variant spec")
    for name in names:
        if name not in parts:
            raise UsageError(f"unknown variant part {name!r} in {spec!r}; choose from: {', '.join(parts)}")
        part = parts[name]
        if part.kind in chosen:
            raise UsageError(f"variant {spec!r} has two {part.kind} parts: {chosen[part.kind].name} and {name}")
        chosen[part.kind] = part
    return Variant(
        spec=spec,
        weights=chosen.get("weights", parts["fp16"]),
        cache=chosen.get("cache", parts["nocache"]),
        engine=chosen.get("engine", parts["hf"]),
        parts=[chosen[k] for k in chosen],
    )


BASELINE = "fp16"


def baseline_variant() -> Variant:
    """What fidelity is measured against: unquantized weights, hf engine, no cache."""
    return parse_variant(BASELINE)


def parse_variants(specs: str) -> list[Variant]:
    return [parse_variant(s.strip()) for s in specs.split(",") if s.strip()]

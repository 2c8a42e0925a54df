"""Variant registry: every part from every module listed here; specs compose parts with '+'.

A new variant is one module in variants/ with a PARTS list, plus its name in _MODULES. A part
defined elsewhere (a plugin, a test) joins with register(part) and leaves with unregister(name).
Either way its name is usable in --variants and its options' flags (Part.options_class) join
the command line (bench.run.config composes the run config from option_classes()).
"""
from __future__ import annotations

import importlib

from bench.errors import UsageError
from variants.base import (GraphEnginePart, GraphExactEnginePart, HFEnginePart, NoCachePart, Part, StaticEnginePart,
                           Variant)

_MODULES = ["variants.fp16", "variants.prefix", "variants.bnb", "variants.int4"]
KINDS = ("weights", "cache", "engine")

_registered: dict[str, Part] = {}  # parts added with register(), after the modules' own


def registry() -> dict[str, Part]:
    parts: dict[str, Part] = {p.name: p for p in (HFEnginePart(), StaticEnginePart(), GraphEnginePart(),
                                                  GraphExactEnginePart(), NoCachePart())}
    for mod in _MODULES:
        for p in importlib.import_module(mod).PARTS:
            parts[p.name] = p
    parts.update(_registered)
    return parts


def register(part: Part) -> Part:
    """Make `part` (an instance of a WeightsPart, CachePart or EnginePart subclass) a variant
    part: usable in --variants by its name, its options' flags on the command line of runs
    configured from now on. Returns the part."""
    if not isinstance(part, Part) or getattr(part, "kind", None) not in KINDS:
        raise TypeError(f"register() takes a weights, cache or engine part, not {part!r}")
    name = getattr(part, "name", "")
    if not name or any(c in name for c in "+, "):
        raise ValueError(f"a variant part needs a name without '+', ',' or spaces, not {name!r}")
    if name in registry():
        raise ValueError(f"a variant part named {name!r} exists already")
    _registered[name] = part
    return part


def registered() -> list[Part]:
    """The parts added with register(), in order (a worker process registers them again)."""
    return list(_registered.values())


def unregister(name: str) -> Part:
    """Remove a part added with register() (the modules' own parts stay)."""
    if name not in _registered:
        raise KeyError(f"no registered variant part named {name!r}")
    return _registered.pop(name)


def option_classes() -> list[type]:
    """The options dataclasses of every part, each once, in registry order."""
    out: list[type] = []
    for part in registry().values():
        cls = part.options_class
        if cls is not None and cls not in out:
            out.append(cls)
    return out


def parse_variant(spec: str) -> Variant:
    """'bnb4+prefix' -> Variant; weights default fp16, cache none, engine hf. Its name, the one
    every row carries, is its parts other than the defaults in kind order (weights, cache,
    engine) joined with '+', fp16 first where it names no weights or cache: one variant has one
    name however it is spelled ('prefix + bnb4' is bnb4+prefix, 'fp16+prefix+hf' is prefix,
    'graph' is fp16+graph, 'nocache' is fp16)."""
    parts = registry()
    chosen: dict[str, Part] = {}
    names = [s.strip() for s in spec.split("+")]
    if not any(names):
        raise UsageError(f"--variants {spec!r}: a variant names no part; give e.g. fp16 or bnb4+prefix")
    if "" in names:
        raise UsageError(f"--variants {spec!r}: an empty part between '+'; give e.g. fp16 or bnb4+prefix")
    for name in names:
        if name not in parts:
            kinds = "; ".join(f"{kind} {', '.join(n for n, p in parts.items() if p.kind == kind)}" for kind in KINDS)
            raise UsageError(f"unknown variant part {name!r} in {spec!r}; parts: {kinds} (vlm-bench list)")
        part = parts[name]
        if part.kind in chosen:
            raise UsageError(f"variant {spec!r} has two {part.kind} parts: {chosen[part.kind].name} and {name}")
        chosen[part.kind] = part
    defaults = {"weights": parts["fp16"], "cache": parts["nocache"], "engine": parts["hf"]}
    shown = [chosen[k] for k in KINDS if k in chosen and chosen[k] is not defaults[k]]
    if not any(p.kind in ("weights", "cache") for p in shown):
        shown.insert(0, defaults["weights"])
    return Variant(
        spec="+".join(p.name for p in shown),
        weights=chosen.get("weights", defaults["weights"]),
        cache=chosen.get("cache", defaults["cache"]),
        engine=chosen.get("engine", defaults["engine"]),
        parts=[chosen[k] for k in KINDS if k in chosen],
    )


BASELINE = "fp16"


def baseline_variant() -> Variant:
    """What fidelity is measured against: unquantized weights, hf engine, no cache."""
    return parse_variant(BASELINE)


def parse_variants(specs: str) -> list[Variant]:
    return [parse_variant(s.strip()) for s in specs.split(",") if s.strip()]

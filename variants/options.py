"""Typed options of variant parts, and how they compose into the run's command line.

A part with settings declares a dataclass of them (`Part.options_class`). Each field made with
`opt(help, default)` is a command-line flag of its own: its name, default and help text are
written there once, and the run config (bench.run.config) gains the field and the flag. A field
made with `run_fact()` is a fact of the run that the part reads but the run owns (the image,
the seed): it has no flag or default here; the run config supplies it. Checks of the values go
in the dataclass's `__post_init__` and raise bench.errors.UsageError.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field, field, fields, is_dataclass


def opt(help: str, default=None, aliases: tuple[str, ...] = (), nonempty: str = ""):
    """A field that is a command-line flag: --name-with-dashes, plus `aliases`. `nonempty` (what
    to give, e.g. "a path"): an empty value is refused rather than taken for the default."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "nonempty": nonempty})


def empty_flag(options) -> str | None:
    """The first flag of a dataclass of options whose value is empty though it must not be (an
    empty --image-path is a mistake, not the demo image), as an error message; None if none."""
    for f in fields(options):
        value = getattr(options, f.name, None)
        if f.metadata.get("nonempty") and isinstance(value, str) and not value.strip():
            return f"--{f.name.replace('_', '-')} is empty; give {f.metadata['nonempty']} or leave the flag out"
    return None


def run_fact():
    """A field the run supplies (no flag or default of its own; keyword-only)."""
    return field(kw_only=True, metadata={"run_fact": True})


def is_run_fact(f: Field) -> bool:
    return bool(f.metadata.get("run_fact"))


def _owner(cls: type, name: str) -> type:
    """The class in `cls`'s MRO that declares the field `name`."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass
    return cls


def flag_fields(classes) -> list[Field]:
    """The flag fields of the options classes, each once: every class's own fields in the order
    given, then the fields they inherit from shared bases (e.g. quantize_vision). Two classes
    declaring one name differently is an error."""
    own: list[Field] = []
    shared: list[Field] = []
    seen: dict[str, tuple[type, Field]] = {}
    for cls in classes:
        if not is_dataclass(cls):
            raise TypeError(f"options class {cls!r} is not a dataclass")
        for f in fields(cls):
            if is_run_fact(f):
                continue
            owner = _owner(cls, f.name)
            if f.name in seen:
                if seen[f.name][0] is not owner:
                    raise TypeError(f"option {f.name!r} is declared by both {seen[f.name][0].__name__} "
                                    f"and {owner.__name__}")
                continue
            if f.default is MISSING and f.default_factory is MISSING:
                raise TypeError(f"option {cls.__name__}.{f.name} has no default (use opt() or run_fact())")
            seen[f.name] = (owner, f)
            (own if owner is cls else shared).append(f)
    return own + shared


def run_facts(classes) -> set[str]:
    """Names of the run facts the options classes read."""
    return {f.name for cls in classes for f in fields(cls) if is_run_fact(f)}


def options_from(cls: type, config):
    """An instance of options class `cls` from `config`: an object with the fields as attributes
    (the run config) or a mapping; fields it lacks take their defaults (run facts have none)."""
    if isinstance(config, Mapping):
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
    else:
        values = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
    return cls(**values)

"""`vlm-bench list`: the names a run accepts, read from the registries (presets, variant parts,
engines, conversation templates, checkpoint layouts)."""
from __future__ import annotations

from bench.cli import PROG, describe
from bench.quiet import quiet_libraries
from bench.errors import ArgumentParser


def _table(title: str, *columns: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=None, pad_edge=False, header_style="bold")
    for i, column in enumerate(columns):  # names (the first column) are never wrapped or cut
        table.add_column(column, no_wrap=i == 0, overflow="fold")
    return table


def tables() -> list:
    """The listing, one rich table per kind of name."""
    from bench.models.presets import PRESETS
    from bench.models.registry import families
    from bench.models.templates import TEMPLATES
    from variants import BASELINE, KINDS, registry

    presets = _table("presets (--preset: exact architectures with random weights; tiny-* for tests)",
                     "preset", "family", "template", "note")
    for p in PRESETS.values():
        presets.add_row(p.name, p.family, p.conv_mode, p.note)

    parts = registry()
    defaults = {"weights": BASELINE, "cache": "nocache", "engine": "hf"}
    variants = _table("variant parts (--variants: up to one part of each kind joined by '+', e.g. bnb4+prefix+static; "
                      f"a kind left out takes its default: {', '.join(defaults.values())}; --engine crosses the "
                      "engine parts with every variant)", "part", "kind", "needs", "what it does")
    for kind in KINDS:
        for name, part in parts.items():
            if part.kind == kind:
                needs = ", ".join((["CUDA"] if part.requires_cuda else []) + list(part.requires_packages))
                default = "the default; " if defaults[kind] == name else ""
                variants.add_row(name, kind, needs or "-", default + part.description)

    templates = _table("conversation templates (--conv-mode; default: the preset's or checkpoint's)",
                       "template", "presets using it")
    for name in TEMPLATES:
        templates.add_row(name, ", ".join(p.name for p in PRESETS.values() if p.conv_mode == name) or "-")

    layouts = _table("checkpoint layouts (--model-path)", "family", "layout")
    for family in families().values():
        layouts.add_row(family.name, family.layout)
    return [presets, variants, templates, layouts]


def parser() -> ArgumentParser:
    return ArgumentParser(prog=f"{PROG} list", description=describe("list"))


def main(argv: list[str]) -> int:
    parser().parse_args(argv)
    quiet_libraries()  # before the model modules are imported (torchao's load messages)
    from bench.log import stdout_console

    console = stdout_console()
    for table in tables():
        console.print(table)
        console.print()
    return 0

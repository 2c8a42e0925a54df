"""`vlm-bench docs [PATH]`: regenerate results/README.md from the metric table."""
from __future__ import annotations

from bench.cli import PROG, describe
from bench.errors import ArgumentParser

DEFAULT_PATH = "results/README.md"


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"{PROG} docs", description=describe("docs"))
    ap.add_argument("path", nargs="?", default=DEFAULT_PATH, help=f"the file written (default: {DEFAULT_PATH})")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from bench.analysis.docs import write_results_readme

    print(f"wrote {write_results_readme(args.path)}")
    return 0

"""Command line: `vlm-bench SUBCOMMAND ...` (= `python -m bench ...`); with no subcommand it runs
the benchmark (`python vila_prefix_benchmark.py ...`). One module per subcommand."""
from __future__ import annotations

import importlib
import sys

# subcommand -> module in bench.cli with a main(argv) -> exit code
COMMANDS = {"run": "run", "summarize": "summarize", "compare": "compare", "report": "report", "docs": "docs",
            "make-checkpoint": "make_checkpoint", "ci-bench": "ci_bench"}


def run_main(argv: list[str] | None = None) -> int:
    from bench.cli.run import main as run

    return run(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(f"bench.cli.{COMMANDS[argv[0]]}").main(argv[1:])
    return run_main(argv)

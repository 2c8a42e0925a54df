"""`vlm-bench docs [PATH]`: regenerate results/README.md from the metric table."""
from __future__ import annotations

import sys

from bench.cli import PROG, describe
from bench.errors import ArgumentParser, no_room

DEFAULT_PATH = "results/README.md"


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"{PROG} docs", description=describe("docs"))
    ap.add_argument("path", nargs="?", default=DEFAULT_PATH,
                    help=f"the file written: a new one, or one this command wrote before (default: {DEFAULT_PATH})")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from bench.analysis.docs import replace_problem, write_results_readme
    from bench.analysis.inputs import BadInput, check_out_file

    try:
        check_out_file(args.path, f"{PROG} docs")
        problem = replace_problem(args.path)
        if problem:
            raise BadInput(f"{PROG} docs {args.path}: {problem}")
        path = write_results_readme(args.path)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if no_room(e):  # exit 4, the one line naming the file (bench.cli.main)
            raise
        print(f"error: {PROG} docs {args.path}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0

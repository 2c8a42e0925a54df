"""`vlm-bench docs [OUT]`: regenerate results/README.md from the metric table."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Regenerate results/README.md's column tables from bench.measure.schema."""
    from bench.analysis.docs import write_results_readme
    from bench.analysis.inputs import BadInput, check_out_file
    from bench.errors import ArgumentParser

    ap = ArgumentParser(prog="python -m bench docs", description=__doc__)
    ap.add_argument("out", nargs="?", default="results/README.md", help="the file to write [default: %(default)s]")
    args = ap.parse_args(argv)
    try:
        check_out_file(args.out, "python -m bench docs")
        path = write_results_readme(args.out)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: python -m bench docs {args.out}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0

"""Write a reference run's MANIFEST from its env.json (date, command, GPU, weights), the commit
whose code ran and one line saying what the run shows. Run from the repository root:

    python scripts/write_manifest.py results/reference/h200/llava-1.5-7b-fp16-prefix-engines \\
        --commit 6ce36a0 --shows "graph and graph-exact engines, cold and warm prefix cache"

Then `python scripts/write_docs.py` puts the run into docs/findings.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.analysis.reference import write_manifest  # noqa: E402
from bench.errors import UsageError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="results directory holding env.json")
    ap.add_argument("--commit", help="the commit whose code ran (default: HEAD's short sha)")
    ap.add_argument("--shows", required=True, help="one line: what the run is evidence of")
    args = ap.parse_args(argv)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    try:
        path = write_manifest(args.run_dir, commit, args.shows)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

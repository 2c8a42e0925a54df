"""Figures and a Markdown summary (report.md) from results directories, without Jupyter.

    vlm-bench report RESULTS_DIR [RESULTS_DIR ...] --out DIR

The comparison notebook calls the same functions (bench.analysis.report), so the notebook and the
static report always show the same thing. Skipped/failed variants and invalid summaries are shown
as such.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.cli import PROG, describe
from bench.errors import ArgumentParser, no_room, path_problem, real_path, shown_path
from bench.analysis.inputs import BadInput, check_out_dir, read_text
from bench.analysis.report import END, START, embed_in_readme, marker_problem, write_report


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"{PROG} report", description=describe("report") + "\n\n" + __doc__.split("\n\n", 1)[1])
    ap.add_argument("dirs", nargs="+", metavar="RESULTS_DIR", help="results directories (with runs.csv and summary.csv)")
    ap.add_argument("--out", required=True, metavar="DIR", help="where report.md and the PNG figures go: a new or empty directory, or an earlier report's (required)")
    ap.add_argument("--readme", help=f"also write the report into this Markdown file, between the lines {START} "
                                     f"and {END} it must hold (--out inside its folder, for the figures' links) "
                                     "(default: none)")
    return ap


def _check_report_dir(out: Path) -> None:
    """--out is new, empty, or an earlier report's (report.md and PNG figures, which it replaces):
    a report never mixes its files into a folder of other files."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not (p.name == "report.md" or p.suffix == ".png"))
    if foreign:
        raise BadInput(f"--out {out} holds files that are not a report's ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}); give a new or empty directory, or an earlier report's")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_out_dir(args.out)
        _check_report_dir(Path(args.out))
        if args.readme is not None:
            problem = path_problem(args.readme) if args.readme.strip() else "empty; give a Markdown file"
            if problem:
                raise BadInput(f"--readme {args.readme}: {problem}")
            readme = read_text(Path(args.readme), "a Markdown file")
            if not os.access(args.readme, os.W_OK):  # refused before any figure is drawn
                raise BadInput(f"--readme {args.readme} is not writable")
            if problem := marker_problem(readme):
                raise BadInput(f"--readme {args.readme}: {problem}")
            written = real_path(args.readme)
            if written.parent == real_path(args.out) and (written.name == "report.md" or written.suffix == ".png"):
                raise BadInput(f"--readme {args.readme} is a file the report writes into --out {args.out}; give "
                               "the README that holds the markers")
            if not real_path(args.out).is_relative_to(real_path(args.readme).parent):
                raise BadInput(f"--out {args.out} must be inside the folder of --readme {args.readme} "
                               "(the README links to its figures)")
            rel = real_path(args.out).relative_to(real_path(args.readme).parent)
            if shown_path(rel) != str(rel):  # a link in a UTF-8 README cannot name it
                raise BadInput(f"--out {shown_path(args.out)}: its name is not UTF-8 text, which the links of "
                               f"--readme {args.readme} to its figures cannot hold; give another --out")
        try:
            path = write_report(args.dirs, args.out)
        except OSError as e:  # a full disk (exit 4), a folder the system will not make: the report left nothing
            if no_room(e):
                raise
            raise BadInput(f"--out {shown_path(args.out)}: cannot write the report ({e.strerror or e})") from None
        if args.readme:
            embed_in_readme(Path(args.readme), path)
    except (FileNotFoundError, BadInput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {shown_path(path)}" + (f" and its block in {shown_path(args.readme)}" if args.readme else ""))
    return 0

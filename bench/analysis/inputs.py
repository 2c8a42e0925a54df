"""Checks on the files compare, report and summarize read: one BadInput saying which file is
wrong and how, before anything is computed or written.

A results file must be UTF-8 text, non-empty, with the columns vlm-bench writes, every row as
many fields as the header (a row short of fields fails here), and a number or nothing in every
metric cell (the harness writes a missing value as an empty cell, never "nan" or text). A
runs.csv's last row without its line end (the harness ends every row with one: a run killed
while writing it) is left out with a warning, as --resume and --append leave it out."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from bench.errors import OneLineError, UsageError, is_link_loop, path_problem, real_path
from bench.measure.results import RESULT_FILES, check_creatable, check_rows, check_run_rows, whole_rows
from bench.measure.schema import WHOLE_IDENTITY
SUMMARY_NUMBERS = frozenset(("n", "median", "mean", "p90", "p99", "stdev", "ci_low", "ci_high", "cv", "measured_s"))
RUNS_REQUIRED = frozenset(("model", "variant", "kind", "status"))
SUMMARY_REQUIRED = frozenset(("model", "variant", "status", "metric", "median"))


class BadInput(OneLineError):
    """A results file or argument the subcommand cannot use (printed as one line, exit 2)."""


def read_text(path: Path, what: str) -> str:
    """The file's text, or BadInput when it is missing, empty, binary or not UTF-8."""
    if not path.is_file():
        raise BadInput(f"{path}: {path_problem(path) or 'no such file'} (expected {what})")
    try:
        data = path.read_bytes()
    except OSError as e:  # unreadable: its permissions, or an I/O error
        raise BadInput(f"{path}: cannot be read ({e.strerror or e.__class__.__name__}) (expected {what})") from None
    if not data.strip():
        raise BadInput(f"{path}: empty file (expected {what})")
    if b"\0" in data:
        raise BadInput(f"{path}: a binary file, not {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text at byte {e.start} (expected {what})") from None


def check_results_csv(path: Path, kind: str = "runs") -> str:
    """The text of `path`, a well-formed runs.csv (kind "runs": less a last row cut off, with a
    warning) or summary.csv ("summary"); BadInput when it is not one."""
    what = f"a {kind}.csv written by vlm-bench"
    text = read_text(path, what)
    whole = whole_rows(text) if kind == "runs" else text
    if whole != text:
        print(f"warning: {path}: its last row was cut off ({len(text) - len(whole)} characters without a line end, "
              "from a run killed while writing it); it is left out", file=sys.stderr)
        text = whole
    required = RUNS_REQUIRED if kind == "runs" else SUMMARY_REQUIRED
    try:
        header = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error as e:
        raise BadInput(f"{path}: not a readable CSV ({e})") from None
    missing = required - set(header)
    if missing:
        raise BadInput(f"{path}: not {what} (missing columns: {', '.join(sorted(missing))})")
    try:
        rows = check_run_rows(text) if kind == "runs" else check_rows(text, SUMMARY_NUMBERS, WHOLE_IDENTITY)
    except ValueError as e:
        raise BadInput(f"{path}: {e}: restore the file or re-run") from None
    if kind == "runs" and not rows:
        raise BadInput(f"{path}: no rows (a run stopped before its first finished request?)")
    return text


def read_env_config(path: Path) -> dict:
    """The run config saved in a results directory's env.json."""
    text = read_text(path, "env.json written by vlm-bench run")
    try:
        env = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise BadInput(f"{path}: not valid JSON (nested too deep)") from None
    if not isinstance(env, dict) or not isinstance(env.get("config"), dict):
        raise BadInput(f"{path}: no run config (\"config\") in it; was it written by vlm-bench run?")
    return env["config"]


def check_out_dir(path: str | Path, flag: str = "--out") -> None:
    """A directory that is there or can be made (its nearest existing folder a writable directory)."""
    if not str(path).strip():
        raise BadInput(f"{flag} is empty; give a directory")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BadInput(f"{flag} {path} is an existing file; give a directory")
    try:
        check_creatable(p, flag)
    except UsageError as e:
        raise BadInput(str(e)) from None


def check_out_file(path: str | Path, flag: str, inputs=()) -> None:
    """BadInput unless `path` can be written as a new or replaced file that is none of `inputs`
    (results directories or files the command reads) nor a results file beside them."""
    if not str(path).strip():
        raise BadInput(f"{flag} is empty; give a file path")
    p = Path(path)
    if is_link_loop(p):
        raise BadInput(f"{flag} {path} is a symbolic link loop; give a file path")
    for given in map(Path, inputs):  # an input that is a link loop is named where it is read
        folder = given if given.is_dir() else given.parent
        if real_path(p) in {real_path(given), *(real_path(folder / name) for name in (*RESULT_FILES, "MANIFEST"))}:
            raise BadInput(f"{flag} {path} would overwrite the results it reads ({given}); give another file")
    if p.is_dir():
        raise BadInput(f"{flag} {path} is a directory; give a file path")
    if not p.parent.is_dir():
        raise BadInput(f"{flag} {path}: no directory {p.parent}")

"""Command line: `vlm-bench COMMAND ...` (= `python -m bench COMMAND ...`). One module per command,
each with a main(argv) -> exit code; `python vila_prefix_benchmark.py FLAGS` is `vlm-bench run FLAGS`.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from bench.errors import ArgumentParser, NothingWritten, UsageError, no_room

PROG = "vlm-bench"


@dataclass(frozen=True)
class Command:
    module: str  # in bench.cli, with main(argv) -> exit code
    help: str  # one line: the listing's and the command's own --help description


COMMANDS: dict[str, Command] = {
    "run": Command("run", "measure variants of a model; write a results directory"),
    "serve": Command("serve", "serve a model, variant and engine over an OpenAI-compatible HTTP API"),
    "list": Command("listing", "list the presets, variant parts, engines and templates"),
    "summarize": Command("summarize", "rebuild summary.csv from a results directory's runs.csv"),
    "compare": Command("compare", "regression verdict between two results (the gate)"),
    "report": Command("report", "figures and report.md from results directories"),
    "int4-kernels": Command("int4_kernels", "list the int4 kernels and what a measured kernel choice chose"),
    "make-checkpoint": Command("make_checkpoint", "write a preset (random weights) as a real checkpoint"),
    "ci-bench": Command("ci_bench", "run the tiny CPU benchmark that the CI gate compares"),
    "docs": Command("docs", "regenerate results/README.md from the metric table"),
}


def describe(name: str) -> str:
    """Command `name`'s --help description: its line in the listing, as a sentence."""
    line = COMMANDS[name].help
    return line[0].upper() + line[1:] + "."


def version() -> str:
    """The installed package's version; from pyproject.toml when run from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("vlm-bench")
    except PackageNotFoundError:
        from pathlib import Path

        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            return "unknown"
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def parser() -> ArgumentParser:
    """The top-level parser: its help and --version (each command parses its own flags)."""
    width = max(map(len, COMMANDS)) + 2
    commands = "\n".join(f"  {name:<{width}}{command.help}" for name, command in COMMANDS.items())
    same = f"`{PROG} --num-runs 3 ...` "
    ap = ArgumentParser(
        prog=PROG, usage=f"{PROG} [-h] [--version] COMMAND ...",
        description="Measure what prefix KV-cache reuse, bitsandbytes 8/4-bit and AWQ int4 save (and cost in\n"
                    "answer quality) on a vision-language model.",
        epilog=f"commands:\n{commands}\n\n"
               f"`{PROG} COMMAND --help` shows a command's flags. Flags without a command run `run`:\n"
               f"{same}= `{PROG} run --num-runs 3 ...`\n"
               f"{' ' * len(same)}= `python vila_prefix_benchmark.py --num-runs 3 ...`.")
    ap.add_argument("--version", action="version", version=f"{PROG} {version()}")
    return ap


def run_main(argv: list[str] | None = None, prog: str = "vila_prefix_benchmark.py") -> int:
    from bench.cli.run import main as run

    return run(argv, prog=prog)


NO_ROOM = 4  # the exit code when the disk (or the user's quota) filled while writing


def _said_no_room(e: Exception, argv: list[str], run: bool) -> int:
    """NO_ROOM, having said so in one line (naming the file, and for a `run` with `argv` what it
    kept), when `e` comes of a full disk; else `e` again."""
    full = no_room(e)
    if full is None:
        raise e
    where = f" writing {full.filename}" if full.filename else ""
    kept = ""
    if isinstance(full, NothingWritten):
        kept = "; nothing was written"
    elif run and _endpoint(argv):  # (cannot be resumed)
        kept = "; the run's finished rows are in its runs.csv (`summarize` builds their summary once there is room)"
    elif run:
        kept = "; a run's finished rows are in its runs.csv (--resume continues it once there is room)"
    print(f"error: no space left on the device{where} ({full.strerror}){kept}", file=sys.stderr)
    return NO_ROOM


def _endpoint(argv: list[str]) -> bool:
    from bench.cli.endpoint import wants_endpoint

    return wants_endpoint(argv)


def _runs(argv: list[str]) -> bool:
    """Whether `vlm-bench ARGV` is the run command (named, or flags without a command)."""
    return bool(argv) and (argv[0] == "run" or (argv[0].startswith("-") and argv[0] not in ("-h", "--help",
                                                                                             "--version")))


def main(argv: list[str] | None = None) -> int:
    """The command's exit code; a disk that fills while it writes is one line and NO_ROOM."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _command(argv)
    except Exception as e:
        return _said_no_room(e, argv, _runs(argv))


def _command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--version"):
        try:
            parser().parse_args(argv[:1] or ["--help"])
        except SystemExit as e:
            return int(e.code or 0)
    name = argv[0]
    if name == "run":
        return run_main(argv[1:], prog=f"{PROG} run")
    if name in COMMANDS:
        try:
            return importlib.import_module(f"bench.cli.{COMMANDS[name].module}").main(argv[1:])
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if name.startswith("-"):  # the benchmark's flags without a command: `run`, as the seed script took them
        return run_main(argv, prog=f"{PROG} run")
    print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)} ({PROG} --help)", file=sys.stderr)
    return 2


def entry(command) -> None:
    """A process's entry: exit with `command()`'s code; Ctrl-C outside the command's own handling
    (its imports, its last printing) ends it with 130 and one line, not a traceback, and a full
    disk with NO_ROOM and one line."""
    try:
        code = command()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # (a full disk: one line; anything else: its traceback)
        code = _said_no_room(e, sys.argv[1:], command is run_main or _runs(sys.argv[1:]))
    sys.exit(code)

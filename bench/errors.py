"""Errors a user can act on: the CLI prints one line and exits with code 2."""
import argparse
import errno
import os
import stat
import textwrap
from pathlib import Path


class OneLineError(Exception):
    """An error printed as one line: a line break or other control character in what it quotes (a
    path, a flag's value) is shown escaped (\\n), so the message stays one line for people and for
    scripts that read the last line."""

    def __str__(self) -> str:
        return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
                       for c in super().__str__())


class UsageError(OneLineError):
    """Bad input from the user (missing image, bad model dir, unknown choice)."""


class NothingWritten(OSError):
    """An OSError (a full disk) that stopped a run before it finished any row: the directory it
    was writing is as it was before (bench.measure.results.DirState)."""


def no_room(e: BaseException | None) -> OSError | None:
    """The no-space (or over-quota) OSError `e` is or was raised while handling, else None: the
    first that names its file where one does (a retry while cleaning up may name none)."""
    seen, found = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            found.append(e)
        e = e.__cause__ or e.__context__
    return next((f for f in found if f.filename), found[0] if found else None)


class VariantUnsupported(Exception):
    """This variant cannot run here (device, kernel capture): a skipped row with the reason."""


def path_problem(path, want: str = "file") -> str | None:
    """Why `path` cannot be read as a `want` ("file": a regular file; "directory"), in words for
    an error message (None: it can): missing, a broken or looping symbolic link, the other kind,
    a FIFO or device (reading one could block for ever), or not readable."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link (its target does not exist)" if p.is_symlink() else f"no such {want}"
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror or e})"
    if want == "directory":
        if not stat.S_ISDIR(mode):
            return "a file, not a directory"
        return None if os.access(p, os.R_OK | os.X_OK) else "not readable (permission denied)"
    if stat.S_ISDIR(mode):
        return "a directory, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    return None if os.access(p, os.R_OK) else "not readable (permission denied)"


def clipped(text: str, width: int) -> str:
    """`text` as it is up to `width` characters, else cut to `width` with its last one an ellipsis
    (cut visibly: a cut path reads as no path)."""
    return text if len(text) <= width else text[:width - 1] + "…"


def not_a_file(path) -> str | None:
    """path_problem's words where `path` is there but holds no file to read (a directory, a FIFO
    or device, a broken or looping symbolic link); None where it is a file, where nothing is there
    (os.path.lexists: said by the caller) and where it cannot be read (said where it is read)."""
    if not os.path.lexists(path):
        return None
    problem = path_problem(path)
    return None if problem is None or problem.startswith(("cannot be read", "not readable")) else problem


def is_link_loop(path) -> bool:
    """Whether following `path`'s symbolic links goes round in a loop (nothing can be read or
    written there)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def real_path(path) -> Path:
    """`path` with its symbolic links followed (os.path.realpath), for telling whether two paths
    name one file. Path.resolve raises RuntimeError on a link loop; here a loop stays in the
    path as it is, for the check that reads or writes it to name (path_problem, is_link_loop)."""
    return Path(os.path.realpath(path))


def shown_path(path) -> str:
    """`path` as text any file or terminal takes: bytes of its name that are not UTF-8 (held by
    os.fsdecode as lone surrogates, which no UTF-8 file can hold) as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class HelpFormatter(argparse.HelpFormatter):
    """Wraps at spaces only (names such as graph-exact or bnb4-fp4 stay whole); a description or
    epilog written with line breaks is printed as written."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line raised as a UsageError (one line, exit 2) instead of a
    usage block; --help and --version print and exit 0 as usual."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} ({self.prog} --help lists the flags)")


def check_seed(seed: int) -> None:
    """UsageError unless `seed` is a whole number from 0 to 2**64 - 1, what the message says
    (torch.manual_seed takes negatives too; random weights, questions and endpoint mode's
    arrivals use it)."""
    if not 0 <= seed < 2**64:
        raise UsageError(f"--seed {seed}: give a whole number from 0 to 2**64 - 1")

"""The one CSV writer (append + flush + fsync per row), the atomic JSON and summary writers,
and a results directory's ownership: its lock file and the checks before a run writes into it."""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import re
import secrets
import tempfile
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

from bench.errors import NothingWritten, UsageError, no_room, path_problem
from bench.measure.schema import RUN_COLUMNS, RUN_METRICS, SUMMARY_COLUMNS, SUMMARY_KEY, WHOLE_IDENTITY


_UNSAFE = frozenset(("Cc", "Cs", "Zl", "Zp"))  # control characters (NUL, escapes, line ends), lone surrogates, separators


def printable(text: str) -> str:
    """Text safe for one line of a CSV cell and a terminal: control characters (random weights
    emit them, NUL among them), lone surrogates and line separators as their escapes; every other
    character (non-breaking spaces, joiners, any script) as it is."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _UNSAFE else c for c in text)


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, str):  # whatever a row holds (a server's text too), the file stays text
        return printable(v)
    return v


class CsvWriter:
    """Writes rows with a fixed column list; each row is flushed and fsynced as it is written,
    so a crash, Ctrl-C or power loss never loses a finished run."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with path.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is no column
                header = next(csv.reader(f), [])
            if header != columns:  # appending would put values under the wrong names
                raise UsageError(f"{path} has other columns (written by another version of the harness): "
                                 "use a new --output-dir")
            data = path.read_bytes()
            cut = len(cut_off_row(data))
            if cut:  # a row cut off by a killed run: rows appended to it would be glued onto it
                from bench.log import status

                status(f"warning: {path}: its last row was cut off ({cut} bytes without a line end, from a run "
                       "killed while writing it); it is dropped")
                os.truncate(path, len(data) - cut)
        self.rows = 0  # rows written by this writer
        self._f = path.open("a", newline="", encoding="utf-8")
        try:
            self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="raise")
            if new:
                self._w.writeheader()
                self._sync()
        except BaseException:  # (a full disk: the header is not left buffered for a later flush)
            with contextlib.suppress(OSError):
                self._f.close()
            raise

    def _sync(self) -> None:
        with _naming(self.path):
            self._f.flush()
            os.fsync(self._f.fileno())

    def write(self, row: dict) -> None:
        with _naming(self.path):
            self._w.writerow({k: _cell(row.get(k)) for k in self.columns})
        self._sync()
        self.rows += 1

    def close(self) -> None:
        with _naming(self.path):  # (a row a full disk refused is still buffered: closing tries it again)
            self._f.close()


def run_writer(out_dir: Path) -> CsvWriter:
    return CsvWriter(out_dir / "runs.csv", list(RUN_COLUMNS))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file under this process's umask


@contextlib.contextmanager
def _naming(path: Path):
    """Within: an OSError that names no file (a write or flush the disk had no room for) is raised
    again naming `path`, so the one line a user reads says which file."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def _atomic_write(path: Path, write) -> None:
    """Write a file through a temporary file in its directory, fsynced, then os.replace: readers
    see the old file or the new one, never a partial (or 0-byte) one."""
    with _naming(path):
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:  # (no inode left: named as the file it was to become, not the temporary one)
            raise OSError(e.errno, e.strerror, str(path)) from e
        try:
            os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would make results readable by their writer alone
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def write_text(path: Path, text: str) -> None:
    """`text` written to `path` atomically (_atomic_write)."""
    _atomic_write(path, lambda f: f.write(text))


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    """A whole CSV, written atomically (the rows are formatted before the file is touched)."""
    cells = [{k: _cell(r.get(k)) for k in columns} for r in rows]

    def write(f):
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        w.writeheader()
        w.writerows(cells)

    _atomic_write(path, write)
    return path


def write_summary(out_dir: Path, rows: list[dict]) -> Path:
    """summary.csv, replaced atomically."""
    return write_csv(out_dir / "summary.csv", list(SUMMARY_COLUMNS), rows)


def _finite(value):
    """`value` with every NaN or infinite float in it as None: JSON has no such numbers (the
    NaN and Infinity json.dumps writes by default are refused by strict readers, jq among them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """`data` as strict JSON (a NaN or infinite number as null), written atomically."""
    text = json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text))


def _value(text: str):
    if text == "":
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cut_off_row(data: bytes) -> bytes:
    """runs.csv's bytes after its last line end: a last row cut off by a run killed while writing
    it (empty when the file ends with a line end)."""
    return data[data.rfind(b"\n") + 1:]


def whole_rows(text: str) -> str:
    """runs.csv's text less a last row cut off without its line end (a run killed while writing it)."""
    return text if not text or text.endswith("\n") else text[: text.rfind("\n") + 1]


# A number as the CSV writer writes one: ASCII digits, no underscores, never inf or nan
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _is_number(cell: str, whole: bool = False) -> bool:
    """Whether `cell` is a finite number as the writer writes one (with `whole`, a whole number,
    also as pandas rewrites one: "4.0")."""
    ok = bool(_NUMBER.fullmatch(cell)) and math.isfinite(float(cell))
    return ok and (not whole or float(cell) == int(float(cell)))


# What tells one run's row from another's in runs.csv: its result, invocation, kind, attempt and
# when it was written (a resume before attempts were numbered past the runs left out could
# write two rows of one attempt, at different times; a copied row repeats them all)
RUN_ROW_KEY = (*SUMMARY_KEY, "kind", "run_index", "timestamp")
# The values runs.csv's status and kind cells hold (another would be a group of its own, or dropped)
RUN_CHOICES = {"status": frozenset({"ok", "skipped", "failed"}), "kind": frozenset({"warmup", "measured", ""})}
# Columns of run indexes: a whole number from -1 (a prefix variant's cold run before the measured
# ones) up, as the writer writes it or pandas rewrites it ("0.0"; --resume counts the attempts made from them)
RUN_INDEXES = frozenset({"run_index"})


# No measurement the harness writes reaches it (1e15 ms is 30,000 years; tokens, MB, J alike); a
# cell past it is damage, and its squares overflow the summaries' arithmetic
MAX_CELL = 1e15


def check_rows(text: str, numbers=frozenset(), whole=frozenset(), unique: tuple[str, ...] = (),
               choices: dict | None = None, indexes=frozenset()) -> int:
    """The number of rows of the CSV `text` (less its header and blank lines); ValueError saying
    why they are not whole rows of its header: a row with another number of fields, a cell of a
    column in `numbers` that is not a finite number from 0 to MAX_CELL, or of one in `whole` that
    is not a whole number in that range (empty cells pass; every metric the harness writes is a time,
    size, rate, share or divergence, none below 0), of one in `indexes` that is not a whole number
    from -1 up, a cell of a column in `choices` not among its values, an ok row
    (status) whose `unique` columns repeat an earlier ok
    row's (a copied row would count twice; rows with the last two of them empty are not numbered,
    and pass), a header naming a column twice, or no readable CSV at all. Written by hand: csv reads
    any row it can split, and pandas fills what it cannot read with NaN."""
    import io

    rows = 0
    seen: dict[tuple, int] = {}
    try:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        header = next(reader, [])
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:  # a reader by name keeps one of them: the other column's values would be lost unseen
            raise ValueError(f"line 1: the header names {', '.join(map(repr, twice))} more than once")
        checked = [(i, name) for i, name in enumerate(header) if name in numbers or name in whole]
        keyed = [header.index(c) for c in unique] if "status" in header and set(unique) <= set(header) else []
        status = header.index("status") if keyed else None
        chosen = [(header.index(c), c, values) for c, values in (choices or {}).items() if c in header]
        indexed = [(i, name) for i, name in enumerate(header) if name in indexes]
        for row in reader:
            if not row:
                continue
            rows += 1
            if len(row) != len(header):
                raise ValueError(f"line {reader.line_num} has {len(row)} fields, the header {len(header)} "
                                 "(truncated or corrupt)")
            for i, name in checked:
                cell = row[i].strip()
                if cell == "":
                    continue
                if not _is_number(cell, name in whole):
                    raise ValueError(f"line {reader.line_num}, column {name}: {cell[:40]!r} is not a "
                                     f"{'whole number' if name in whole else 'finite number'}")
                if not 0 <= float(cell) <= MAX_CELL:
                    raise ValueError(f"line {reader.line_num}, column {name}: {cell[:40]!r} is "
                                     f"{'below 0' if float(cell) < 0 else f'above {MAX_CELL:g}'}, which no "
                                     "measurement the harness writes is")
            for i, name in indexed:
                cell = row[i].strip()
                if cell and not (_is_number(cell, whole=True) and float(cell) >= -1):
                    raise ValueError(f"line {reader.line_num}, column {name}: {row[i][:40]!r} is not a whole "
                                     "number from -1")
            for i, name, values in chosen:
                if row[i] not in values:
                    raise ValueError(f"line {reader.line_num}, column {name}: {row[i][:40]!r} is none of "
                                     f"{', '.join(sorted(v for v in values if v))}")
            if keyed and row[status] == "ok" and all(row[i].strip() for i in keyed[-2:]):  # numbered, stamped rows
                key = tuple(row[i] for i in keyed)
                if key in seen:
                    raise ValueError(f"line {reader.line_num} repeats the run of line {seen[key]} (the same "
                                     f"{', '.join(c for c in unique if c in header)}): a copied row would count "
                                     "twice")
                seen[key] = reader.line_num
    except csv.Error as e:
        raise ValueError(f"not a readable CSV ({e})") from None
    return rows


def check_run_rows(text: str) -> int:
    """check_rows for runs.csv: its metrics and counts, one row per run, its status and kind values,
    its run indexes."""
    return check_rows(text, RUN_METRICS, WHOLE_IDENTITY, RUN_ROW_KEY, RUN_CHOICES, RUN_INDEXES)


def summary_problem(out_dir: Path) -> str | None:
    """Why out_dir/summary.csv cannot be replaced by a new one (it is a directory or other
    non-file), in words for an error message; None when it can (or does not exist)."""
    summary = out_dir / "summary.csv"
    if not (summary.exists() or summary.is_symlink()) or summary.is_file():
        return None
    return f"{summary}: {path_problem(summary)}; remove it (summary.csv is rebuilt from runs.csv)"


def read_runs(path: Path) -> list[dict]:
    """runs.csv's whole rows with cells typed back (empty: None, true/false, numbers)."""
    import io

    with path.open(encoding="utf-8-sig", newline="") as f:
        text = whole_rows(f.read())
    return [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text, newline=""))]


# ---------------------------------------------------------------------------------------------
# A results directory has one owner: one run writes it (or one --append / --resume after it).
LOCK_NAME = ".lock"


def _locked(path: Path) -> int | None:
    """The lock file's PID while a live process holds its lock (fcntl.flock: the kernel releases it
    when its holder exits, killed or not, so a stale file is never mistaken for a live run even
    when its PID has been reused); None when nobody holds it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file, or one this process cannot open (a directory): nobody holds it
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode("ascii", "replace").split()
            return int(text[0]) if text and text[0].isdigit() else -1
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def lock_holder(out_dir: Path) -> int | None:
    """The PID of the live process holding out_dir's lock (-1 when it wrote none yet), or None
    (no lock file, or a stale one)."""
    return _locked(out_dir / LOCK_NAME)


def check_creatable(path: Path, flag: str, writable: bool = True) -> None:
    """A usage error naming `flag` unless `path` is a directory or could be made one: the nearest
    folder of it that exists is a directory (and, `writable`, one this process may write in)."""
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):  # to be made (or below a file: said below)
        pass
    except OSError as e:  # a folder above it this user may not enter
        raise UsageError(f"{flag} {path} cannot be reached ({e.strerror or e.__class__.__name__})") from None
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{flag} {path} is a broken symbolic link (or a loop); point it at a directory or remove it")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory")
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest existing folder is where it would be made
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, not a directory")
    if writable and not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} is not writable")


def make_dir(path: Path, flag: str) -> None:
    """Make the directory `path` (and its parents), a usage error naming `flag` when it cannot
    be made (a place check_creatable passes but the system refuses: /proc, a full disk, root's
    write access to a read-only file system)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be created ({e.strerror or e.__class__.__name__})") from None


def check_output_dir(out_dir: Path, mode: str) -> None:
    """Refuse (UsageError, nothing written) an --output-dir this run may not write: a file, an
    unwritable place, a directory another live run holds, a non-empty directory unless `mode` is
    "append" or "resume" ("new" otherwise; "fresh": new, for a command that cannot append or
    resume, e.g. `run --endpoint`), or a directory whose files are not this harness's."""
    check_creatable(out_dir, "--output-dir")
    if not out_dir.exists():
        return
    holder = lock_holder(out_dir)
    if holder is not None:
        shown = f"PID {holder}, " if holder > 0 else ""
        raise UsageError(f"--output-dir {out_dir} is in use by another run ({shown}lock file {out_dir / LOCK_NAME})")
    entries = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_NAME)
    if not entries:
        return
    runs = out_dir / "runs.csv"
    for name in RESULT_FILES:  # read (runs.csv appended to) by --append and --resume
        f = out_dir / name
        need = os.R_OK | (os.W_OK if name == "runs.csv" and mode not in ("new", "fresh") else 0)
        if f.is_file() and not os.access(f, need):
            raise UsageError(f"{f} is not {'readable and writable' if need & os.W_OK else 'readable'} "
                             "by this user: use a new --output-dir")
    if runs.is_file() and runs.stat().st_size:
        import io

        with runs.open("rb") as f:
            head = f.read(1 << 16)  # the header line, and enough to tell a binary file
        if b"\0" in head:
            raise UsageError(f"{runs} is a binary file, not a runs.csv this harness wrote: use a new --output-dir")
        header = next(csv.reader(io.StringIO(head.decode("utf-8-sig", errors="replace"), newline="")), [])
        if header != list(RUN_COLUMNS):
            raise UsageError(f"{runs} has columns this harness does not write (another program's or "
                             "another version's file): use a new --output-dir")
        if mode not in ("new", "fresh"):  # appended to or resumed: its rows must be whole ones (read once)
            try:
                text = runs.read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise UsageError(f"{runs} is not UTF-8 text (byte {e.start}): not a file this harness wrote intact; "
                                 "use a new --output-dir") from None
            try:
                check_run_rows(whole_rows(text))
            except ValueError as e:
                raise UsageError(f"{runs}: {e}: restore the file or use a new --output-dir") from None
    problem = summary_problem(out_dir)
    if mode not in ("new", "fresh") and problem:
        raise UsageError(f"{problem}, or use a new --output-dir")
    if mode in ("new", "fresh"):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        if mode == "fresh":
            raise UsageError(f"--output-dir {out_dir} is not empty ({shown}): give a new or empty --output-dir")
        raise UsageError(f"--output-dir {out_dir} is not empty ({shown}): give --append to add a run to it, "
                         "--resume to finish its run, or a new --output-dir")
    if not (runs.is_file() and (out_dir / "env.json").is_file()):
        raise UsageError(f"--output-dir {out_dir} holds files but no results of this harness "
                         "(runs.csv and env.json): use a new --output-dir")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {out_dir} is not writable")


class DirLock:
    """out_dir/.lock, held with fcntl.flock for as long as this run writes the directory (the
    kernel drops it when the process ends, however it ends) and holding the PID for the message
    a refused run prints; a lock file nobody holds is stale and taken over. release() removes it."""

    def __init__(self, out_dir: Path):
        import fcntl

        self.path = out_dir / LOCK_NAME
        self.pid = os.getpid()
        if self.path.is_dir() or self.path.is_symlink():
            raise UsageError(f"--output-dir {out_dir}: its lock file {self.path} is not a file; remove it")
        try:
            self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise UsageError(f"--output-dir {out_dir} is not writable ({errno.errorcode.get(e.errno, e)})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            if not isinstance(e, BlockingIOError):
                raise UsageError(f"--output-dir {out_dir}: cannot lock {self.path} ({e.strerror or e}); use a "
                                 "directory on a local file system") from None
            holder = lock_holder(out_dir)
            shown = f"PID {holder}, " if holder and holder > 0 else ""
            raise UsageError(f"--output-dir {out_dir} is in use by another run ({shown}lock file {self.path})") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{self.pid}\n".encode())

    def release(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
        try:
            os.close(self._fd)  # the lock goes with the descriptor
        except OSError:
            pass


RESULT_FILES = ("runs.csv", "env.json", "summary.csv")  # what a run writes into its directory


def _length_and_tail(path: Path, chunk: int = 1 << 16) -> tuple[int, bytes]:
    """(the file's length, its cut-off last row, read from its last `chunk` bytes): what
    CsvWriter drops before appending (DirState puts it back)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - chunk))
        return size, cut_off_row(f.read())


class DirState:
    """What a results directory held before a run (runs.csv's length, env.json's and summary.csv's
    bytes, and which of its folders did not exist yet), so that a run refused after it began
    writing (a usage error found once the model is loaded) puts it back: restore_files() truncates
    runs.csv, rewrites what changed and removes the files the run created, remove_created() the
    empty folders it created."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.created: list[Path] = []  # innermost first
        d = out_dir
        while not d.exists() and d != d.parent:
            self.created.append(d)
            d = d.parent
        self.files: dict[str, tuple[int, bytes] | bytes] = {}
        for name in RESULT_FILES if out_dir.is_dir() else ():
            f = out_dir / name
            if f.is_file():
                self.files[name] = _length_and_tail(f) if name == "runs.csv" else f.read_bytes()

    def restore_files(self) -> bool:
        """runs.csv, env.json and summary.csv as they were (call while holding the directory's lock,
        so no other run's writing is undone); whether all of them were (best effort: a full disk
        may not let env.json be rewritten)."""
        whole = True
        for name in RESULT_FILES:
            f, old = self.out_dir / name, self.files.get(name)
            try:
                if old is None:
                    f.unlink(missing_ok=True)
                elif isinstance(old, tuple):  # runs.csv: appended to, its cut-off last row dropped
                    size, tail = old
                    if f.stat().st_size != size or _length_and_tail(f)[1] != tail:
                        os.truncate(f, size - len(tail))
                        with f.open("ab") as out:
                            out.write(tail)
                elif f.read_bytes() != old:
                    _atomic_write(f, lambda out, text=old.decode("utf-8"): out.write(text))
            except (OSError, UnicodeDecodeError):
                whole = False  # the error that stopped the run is what the user is told
        return whole

    def nothing_written(self, e: BaseException, rows: int) -> NothingWritten | None:
        """Where `e` is a full disk's and stopped a run before it wrote any row (`rows`), and every
        file is put back (restore_files: under the lock): the NothingWritten to raise from `e`; else
        None (`e` is raised as it is: finished rows are kept, or the disk let nothing be put back)."""
        full = no_room(e)
        if full is None or rows or not self.restore_files():
            return None
        return NothingWritten(full.errno, full.strerror, full.filename)

    def remove_created(self) -> None:
        """The folders the run made, where they are empty (after its lock is released: the lock
        file is in the innermost one)."""
        for d in self.created:
            try:
                d.rmdir()  # only while empty (another run's files in a parent: kept)
            except OSError:
                break


def new_run_id() -> str:
    """One invocation's id: its UTC start time and a random suffix, e.g. 20250101-120000-3fa2c1."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

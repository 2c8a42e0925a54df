"""The one CSV writer (append + flush per row) and the env.json / summary writers."""
from __future__ import annotations

import csv
import json
import math
import secrets
from datetime import datetime, timezone
from pathlib import Path

from bench.errors import UsageError
from bench.measure.schema import RUN_COLUMNS, SUMMARY_COLUMNS


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


class CsvWriter:
    """Writes rows with a fixed column list; each row is flushed (and fsynced) as it is written,
    so a crash or Ctrl-C never loses a finished run."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if header != columns:  # appending would put values under the wrong names
                raise UsageError(f"{path} has other columns (written by another version of the harness): "
                                 "use a new --output-dir")
        self._f = path.open("a", newline="", encoding="utf-8")
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="raise")
        if new:
            self._w.writeheader()
            self._f.flush()

    def write(self, row: dict) -> None:
        self._w.writerow({k: _cell(row.get(k)) for k in self.columns})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def run_writer(out_dir: Path) -> CsvWriter:
    return CsvWriter(out_dir / "runs.csv", list(RUN_COLUMNS))


def write_summary(out_dir: Path, rows: list[dict]) -> Path:
    path = out_dir / "summary.csv"
    if path.exists():
        path.unlink()
    w = CsvWriter(path, list(SUMMARY_COLUMNS))
    for r in rows:
        w.write(r)
    w.close()
    return path


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def new_run_id() -> str:
    """One invocation's id: its UTC start time and a random suffix, e.g. 20250101-120000-3fa2c1."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

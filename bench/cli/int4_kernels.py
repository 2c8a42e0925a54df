"""`vlm-bench int4-kernels [FILE]`: the W4A16 kernels `--int4-kernels` takes, whether each runs
here, and what `--int4-kernels measured` measured and chose (kept in the int4 cache directory's
kernels.json), as a table or, with --out, a CSV (one row per shape, kernel and row count)."""
from __future__ import annotations

import sys

from bench.cli import PROG, describe
from bench.quant import DEFAULT_CACHE_DIR, KERNELS_FILE
from bench.errors import ArgumentParser, UsageError, no_room, path_problem

DEFAULT_FILE = f"{DEFAULT_CACHE_DIR}/{KERNELS_FILE}"  # where a run with the default --int4-cache-dir keeps them
CSV_COLUMNS = ["device", "dtype", "versions", "graph", "dense_copy", "pdl", "pdl_prefetch", "pdl_preload",
               "pdl_late", "kernel_settings", "candidates", "points", "out_features", "in_features", "group_size",
               "kernel", "rows", "us", "int4_gb_per_s", "max_rel_err", "chosen", "left_out", "reused", "error_reused"]


def _pdl_columns(fields: dict) -> dict:
    """The kernel table's pdl_prefetch, pdl_preload and pdl_late of a measurement's key (empty
    without PDL)."""
    from bench.quant.w4a16.measurements import pdl_launch

    return dict(zip(("pdl_prefetch", "pdl_preload", "pdl_late"), pdl_launch(fields) or ("", "", "")))


def _pdl_text(fields: dict) -> str:
    """How the listing names a measurement's PDL launch (nothing without PDL)."""
    from bench.quant.w4a16.measurements import pdl_launch

    launch = pdl_launch(fields)
    return f", PDL (prefetch {launch[0]}/4{', preload' if launch[1] else ''}{', late' if launch[2] else ''})" \
        if launch else ""


def _settings_column(fields: dict, kernel: str) -> str:
    """The kernel table's kernel_settings of a row: the settings (JSON) its kernel was measured with
    (measurements.kernel_settings), empty for a kernel that has none or is not among the key's
    candidates (one that cannot run here, say)."""
    import json

    from bench.quant.w4a16.measurements import kernel_settings

    settings = kernel_settings(fields, kernel) if kernel in fields["candidates"] else None
    return "" if settings is None else json.dumps(settings, sort_keys=True)


def _settings_text(fields: dict) -> str:
    """How the listing names the timing settings of a measurement's candidates that have them."""
    from bench.quant.w4a16.measurements import kernel_settings

    named = [(name, kernel_settings(fields, str(name))) for name in fields["candidates"]]
    return "".join(f", {name} " + " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                                           for k, v in sorted(settings.items()))
                   for name, settings in named if settings)


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"{PROG} int4-kernels", description=describe("int4-kernels"))
    ap.add_argument("file", nargs="?", metavar="FILE", default=None,
                    help=f"kernel measurements (default {DEFAULT_FILE}; another --int4-cache-dir keeps them in "
                         "its kernels.json)")
    ap.add_argument("--out", metavar="CSV", default=None,
                    help="write every measurement to this new CSV (device, dtype, library versions, CUDA graph "
                         "or eager, dense copy or not, PDL, the kernel's timing settings, the candidates chosen "
                         "from, the row counts measured, shape, kernel, rows, us, max_rel_err, chosen, "
                         "left_out, reused: the time was measured for another candidate set or other row "
                         "counts, error_reused: so was the error, where the kernel was not chosen); "
                         "default: print the choices")
    return ap


def _entries(path, explicit: bool) -> list[tuple[dict, object]]:
    """[(key fields, ShapePlan)] of the file; [] when the default file does not exist yet."""
    from bench.quant.w4a16.measurements import parse_entries, read_entries

    if path.is_dir():
        raise UsageError(f"{path} is a directory; give the kernels.json file in it")
    if not path.exists() and not path.is_symlink():
        if explicit:
            raise UsageError(f"{path}: no such file")
        return []
    problem = path_problem(path)  # a FIFO would block the read for ever
    if problem:
        raise UsageError(f"{path}: {problem}")
    try:
        entries = read_entries(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise UsageError(f"{path} is not an int4 kernel measurements file ({' '.join(str(e).split())[:200]})") from None
    good, bad = parse_entries(entries)
    if bad:
        why = next(iter(bad.values()))
        if not good:
            raise UsageError(f"{path} is not an int4 kernel measurements file (none of its {len(bad)} entries "
                             f"reads: {why})")
        print(f"warning: {path}: {len(bad)} of {len(entries)} entries malformed and left out ({why})", file=sys.stderr)
    return [(fields, plan) for _, fields, plan in good]


def _check_out(out) -> None:
    import os

    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"--out {out}: give a file in an existing directory")
    if out.exists():
        raise UsageError(f"--out {out} exists; give a new file")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {out.parent} is not writable")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from pathlib import Path

    from bench.measure.results import write_csv
    from bench.quiet import quiet_libraries

    quiet_libraries()
    import torch
    from rich.table import Table

    from bench.log import stdout_console

    from bench.quant.w4a16.choice import plan_text, table_rows
    from bench.quant.w4a16.registry import KERNELS

    path = Path(args.file or DEFAULT_FILE).expanduser()
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        _check_out(out)
    entries = _entries(path, args.file is not None)
    if out is not None:
        if not entries:
            raise UsageError(f"{path} holds no measurements; run with --int4-kernels measured first")
        rows = [{"device": fields["device"], "dtype": fields["dtype"],
                 "versions": " ".join(f"{k}={v}" for k, v in sorted(fields["versions"].items())),
                 "graph": fields.get("graph"), "dense_copy": fields.get("dense_copy"),
                 "pdl": bool(fields.get("pdl")), **_pdl_columns(fields),
                 "kernel_settings": _settings_column(fields, row["kernel"]),
                 "candidates": " ".join(map(str, fields["candidates"])),
                 "points": " ".join(map(str, fields["points"])),
                 **row}
                for fields, plan in entries for row in table_rows([plan])]
        try:
            write_csv(out, CSV_COLUMNS, rows)
        except OSError as e:
            if no_room(e):  # exit 4, the one line naming the file (bench.cli.main)
                raise
            raise UsageError(f"--out {out}: cannot write it ({e.strerror or e})") from None
        print(out)
        return 0

    console = stdout_console()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    console.print(f"int4 kernels (--int4-kernels NAME, or measured; here: {device.type}, "
                  f"{str(dtype).removeprefix('torch.')})")
    kernels = Table(box=None, header_style="bold")
    kernels.add_column("kernel", no_wrap=True)
    kernels.add_column("own weight format", no_wrap=True)
    kernels.add_column("here", overflow="fold")
    for name, k in KERNELS.items():
        reason = k.unavailable(device, dtype)  # a sentence naming the kernel: the row names it already
        kernels.add_row(name, k.state_key or "-", reason.removeprefix(f"{name} ") if reason else "runs")
    console.print(kernels)
    console.print()
    if not entries:
        console.print(f"no measurements in {path} (a run with --int4-kernels measured makes them)")
        return 0
    chosen = Table(title=f"measured choices ({path})", title_justify="left", box=None, header_style="bold")
    for column in ("device", "dtype", "shape (out x in, group)", "candidates"):
        chosen.add_column(column, overflow="fold")
    chosen.add_column("kernel per row count", no_wrap=True)  # the answer: others fold first
    for fields, plan in entries:
        n, k, g = plan.shape
        eager = fields.get("graph") is False and not fields["device"].startswith("cpu")  # timed launched eagerly
        copy = ((", dense copy" if fields.get("dense_copy") else "") + (", eager" if eager else "")
                + _pdl_text(fields) + _settings_text(fields))
        chosen.add_row(fields["device"], fields["dtype"], f"{n}x{k}, g{g}{copy}",
                       ", ".join(map(str, fields["candidates"])), plan_text(plan.plan, 0))
    console.print(chosen)
    return 0

"""`vlm-bench int4-kernels [FILE]`: the W4A16 kernels `--int4-kernels` takes, whether each runs
here, and what `--int4-kernels measured` measured and chose (kept in the int4 cache directory's
kernels.json), as a table or, with --out, a CSV (one row per shape, kernel and row count)."""
from __future__ import annotations

from bench.cli import PROG, describe
from bench.errors import ArgumentParser

DEFAULT_FILE = "~/.cache/vlm-bench/int4/kernels.json"  # --int4-cache-dir's default + kernels.json
CSV_COLUMNS = ["device", "dtype", "versions", "out_features", "in_features", "group_size", "kernel", "rows", "us",
               "max_rel_err", "chosen", "left_out"]


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"{PROG} int4-kernels", description=describe("int4-kernels"))
    ap.add_argument("file", nargs="?", metavar="FILE", default=None,
                    help=f"kernel measurements (default {DEFAULT_FILE}; another --int4-cache-dir keeps them in "
                         "its kernels.json)")
    ap.add_argument("--out", metavar="CSV", default=None,
                    help="write every measurement to this CSV (device, dtype, library versions, shape, kernel, "
                         "rows, us, max_rel_err, chosen, left_out); default: print the choices")
    return ap


def _entries(path, explicit: bool) -> list[tuple[dict, object]]:
    """[(key fields, ShapePlan)] of the file; [] when the default file does not exist yet."""
    import json

    from bench.errors import UsageError
    from bench.quant.w4a16.measurements import CACHE_VERSION, ShapePlan

    if not path.is_file():
        if explicit:
            raise UsageError(f"{path}: no such file")
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CACHE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
        out = []
        for key, entry in data["entries"].items():
            fields = json.loads(key)
            out.append((fields, ShapePlan.from_json(fields["shape"], entry)))
        return out
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not an int4 kernel measurements file ({e.__class__.__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from pathlib import Path

    from bench.errors import UsageError
    from bench.measure.results import CsvWriter
    from bench.quiet import quiet_libraries

    quiet_libraries()
    import torch
    from rich.console import Console
    from rich.table import Table

    from bench.quant.w4a16.choice import plan_text, table_rows
    from bench.quant.w4a16.registry import KERNELS

    path = Path(args.file or DEFAULT_FILE).expanduser()
    entries = _entries(path, args.file is not None)
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise UsageError(f"--out {out}: give a file in an existing directory")
        if out.exists():
            raise UsageError(f"--out {out} exists; give a new file")
        if not entries:
            raise UsageError(f"{path} holds no measurements; run with --int4-kernels measured first")
        writer = CsvWriter(out, CSV_COLUMNS)
        try:
            for fields, plan in entries:
                for row in table_rows([plan]):
                    writer.write({"device": fields["device"], "dtype": fields["dtype"],
                                  "versions": " ".join(f"{k}={v}" for k, v in sorted(fields["versions"].items())),
                                  **row})
        finally:
            writer.close()
        print(out)
        return 0

    console = Console()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kernels = Table(title=f"int4 kernels (--int4-kernels NAME, or measured; here: {device.type}, {dtype})",
                    title_justify="left", box=None, header_style="bold")
    kernels.add_column("kernel", no_wrap=True)
    kernels.add_column("own weight format", no_wrap=True)
    kernels.add_column("here", overflow="fold")
    for name, k in KERNELS.items():
        kernels.add_row(name, k.state_key or "-", k.unavailable(device, dtype) or "runs")
    console.print(kernels)
    console.print()
    if not entries:
        console.print(f"no measurements in {path} (a run with --int4-kernels measured makes them)")
        return 0
    chosen = Table(title=f"measured choices ({path})", title_justify="left", box=None, header_style="bold")
    for column in ("device", "dtype", "shape (out x in, group)", "kernel per row count"):
        chosen.add_column(column, overflow="fold")
    for fields, plan in entries:
        n, k, g = plan.shape
        chosen.add_row(fields["device"], fields["dtype"], f"{n}x{k}, g{g}", plan_text(plan.plan, 0))
    console.print(chosen)
    return 0

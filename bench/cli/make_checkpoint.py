"""`vlm-bench make-checkpoint`: write a preset to disk in its family's real layout."""
from __future__ import annotations

from bench.errors import ArgumentParser
import sys

from bench.cli.common import quiet_libraries


def main(argv: list[str]) -> int:
    """Write a preset (random weights) to disk in its family's real layout."""
    from bench.errors import UsageError

    p = ArgumentParser(prog="python -m bench make-checkpoint")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_libraries()
    import shutil
    from pathlib import Path

    import torch

    from bench.measure.results import check_creatable
    from bench.models.loader import build_preset, save_checkpoint
    from bench.models.presets import get_preset
    from bench.run.runner import resolve_device

    try:
        get_preset(args.preset)
        if args.dtype not in ("float16", "bfloat16", "float32"):
            raise UsageError(f"unknown --dtype {args.dtype!r}; choose float16, bfloat16 or float32")
        device = resolve_device(args.device)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {args.out} is an existing file; give a new or empty directory")
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"--out {args.out} is a non-empty directory; give a new or empty directory")
        check_creatable(out, "--out")
        adapter = build_preset(args.preset, None, device, getattr(torch, args.dtype), args.seed)
        existed = out.is_dir()
        try:
            save_checkpoint(adapter, out)
        except OSError as e:  # a full disk, a place that refuses writes: no half-written checkpoint stays
            if existed:
                for p in out.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            else:
                shutil.rmtree(out, ignore_errors=True)
            raise UsageError(f"--out {args.out}: the checkpoint could not be written ({e.strerror or e})") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"wrote {args.preset} ({adapter.family} layout, weights=random) to {args.out}")
    return 0

"""`vlm-bench make-checkpoint`: write a preset to disk in its family's real layout."""
from __future__ import annotations

import argparse
import sys

from bench.cli.common import quiet_libraries


def main(argv: list[str]) -> int:
    """Write a preset (random weights) to disk in its family's real layout."""
    from bench.errors import UsageError

    p = argparse.ArgumentParser(prog="python -m bench make-checkpoint")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_libraries()
    import torch

    from bench.models.loader import build_preset, save_checkpoint

    try:
        adapter = build_preset(args.preset, None, torch.device(args.device), getattr(torch, args.dtype), args.seed)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    save_checkpoint(adapter, Path(args.out))
    print(f"wrote {args.preset} ({adapter.family} layout, weights=random) to {args.out}")
    return 0

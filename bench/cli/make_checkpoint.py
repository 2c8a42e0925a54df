"""`vlm-bench make-checkpoint`: write a preset to disk in its family's real layout."""
from __future__ import annotations

import re
import sys

from bench.cli import PROG, describe
from bench.quiet import quiet_libraries
from bench.errors import ArgumentParser
from bench.models.sentencepiece_files import TOKENIZER_FILES

SHARD_SIZE = re.compile(r"[1-9][0-9]*(KB|MB|GB)")  # what transformers' save_pretrained takes


def parser() -> ArgumentParser:
    quiet_libraries()  # before the model modules are imported (torchao's load messages)
    from bench.models.presets import PRESETS
    from bench.models.registry import layouts

    p = ArgumentParser(prog=f"{PROG} make-checkpoint",
                       description=f"{describe('make-checkpoint')[:-1]}: {layouts()}. The directory is a "
                                   "--model-path for `run`.")
    p.add_argument("--preset", required=True,
                   help=f"the architecture written (required); one of: {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, help="a new or empty directory (required)")
    p.add_argument("--device", default="cpu", help="where the weights are made: cuda, cuda:N, cpu or auto "
                                                   "(default: cpu)")
    p.add_argument("--dtype", default="float16", help="float16, bfloat16 or float32 (default: float16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--shard-size", help="write the weights in shards of at most this size with a "
                                        "model.safetensors.index.json, as published checkpoints are, e.g. 5GB or "
                                        "200KB (default: transformers' shard size, one file for small models)")
    p.add_argument("--tokenizer-files", default="json", choices=TOKENIZER_FILES,
                   help="the tokenizer as tokenizer.json, as a SentencePiece tokenizer.model with a published-style "
                        "tokenizer_config.json (VILA1.5's llm/ ships only that), or both (as LLaVA-1.5 does); "
                        "LLaVA, VILA and InternVideo presets (InternLM2 publishes tokenizer.model) (default: json)")
    return p


def main(argv: list[str]) -> int:
    from bench.errors import UsageError

    args = parser().parse_args(argv)
    quiet_libraries()
    import shutil
    from pathlib import Path

    import torch
    from safetensors import SafetensorError

    from bench.measure.results import check_creatable
    from bench.errors import check_seed
    from bench.models.loader import build_preset, save_checkpoint
    from bench.models.presets import get_preset
    from bench.models.sentencepiece_files import write_sentencepiece
    from bench.run.runner import resolve_device

    try:
        get_preset(args.preset)
        if args.shard_size is not None and not SHARD_SIZE.fullmatch(args.shard_size):
            raise UsageError(f"--shard-size {args.shard_size!r}: give a size such as 5GB, 500MB or 200KB")
        if args.dtype not in ("float16", "bfloat16", "float32"):
            raise UsageError(f"unknown --dtype {args.dtype!r}; choose float16, bfloat16 or float32")
        if args.tokenizer_files != "json" and get_preset(args.preset).qwen_tokenizer:
            raise UsageError(f"--tokenizer-files {args.tokenizer_files}: {args.preset}'s Qwen2 tokenizer is published as "
                             "tokenizer.json; SentencePiece files are written for LLaVA, VILA and InternVideo presets")
        check_seed(args.seed)
        device = resolve_device(args.device)
        if not args.out.strip():
            raise UsageError("--out is empty; give a new or empty directory")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {args.out} is an existing file; give a new or empty directory")
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"--out {args.out} is a non-empty directory; give a new or empty directory")
        check_creatable(out, "--out")
        adapter = build_preset(args.preset, None, device, getattr(torch, args.dtype), args.seed)
        existed = out.is_dir()
        try:
            save_checkpoint(adapter, out, args.shard_size)
            if args.tokenizer_files != "json":
                for folder in (out, out / "llm"):  # the llava-hf root, VILA's llm/
                    if (folder / "tokenizer.json").is_file():
                        write_sentencepiece(folder, keep_json=args.tokenizer_files == "both")
        # a full disk (safetensors says so in an error of its own), a place that refuses writes,
        # Ctrl-C: no half-written checkpoint stays
        except (OSError, SafetensorError, KeyboardInterrupt) as e:
            if existed:
                for p in out.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            else:
                shutil.rmtree(out, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt):
                raise
            why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
            raise UsageError(f"--out {args.out}: the checkpoint could not be written ({why})") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # SIGINT; nothing of the checkpoint is left
        print(f"\ninterrupted: no checkpoint written to {args.out}", file=sys.stderr)
        return 130

    print(f"wrote {args.preset} ({adapter.family} layout, weights=random) to {args.out}")
    return 0

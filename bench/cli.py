"""Command line: `python vila_prefix_benchmark.py ...` and `python -m bench [run|make-checkpoint|docs] ...`."""
from __future__ import annotations

import argparse
import os
import shlex
import sys


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    # torchao reports optional CUDA extensions it cannot load on CPU builds, and torch warns
    # about torchao's enum registrations: neither concerns the int4 kernels used here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_main(argv: list[str] | None = None) -> int:
    from bench.config import config_from_args
    from bench.console import print_summary
    from bench.errors import UsageError

    try:
        cfg = config_from_args(argv)
        _quiet_libraries()
        from bench.runner import Benchmark

        argv = sys.argv[1:] if argv is None else argv
        bench = Benchmark(cfg, shlex.join(["vila_prefix_benchmark.py", *argv]))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out_dir = bench.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are in {bench.out_dir}/runs.csv", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(bench.summary_rows(), out_dir, bench.source.weights)
    return 0


def make_checkpoint_main(argv: list[str]) -> int:
    """Write a preset (random weights) to disk in its family's real layout."""
    from bench.errors import UsageError

    p = argparse.ArgumentParser(prog="python -m bench make-checkpoint")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _quiet_libraries()
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


def docs_main(argv: list[str]) -> int:
    """Regenerate results/README.md's column tables from bench.metrics."""
    from bench.docs import write_results_readme

    path = write_results_readme(argv[0] if argv else "results/README.md")
    print(f"wrote {path}")
    return 0


def compare_main(argv: list[str]) -> int:
    from bench.compare import main as compare

    return compare(argv)


def ci_bench_main(argv: list[str]) -> int:
    """Run the tiny CPU benchmark CI gates on (see bench/ci.py)."""
    from bench.ci import CI_BENCH_ARGS

    if len(argv) != 1:
        print("usage: python -m bench ci-bench OUTPUT_DIR", file=sys.stderr)
        return 2
    return run_main([*CI_BENCH_ARGS, "--output-dir", argv[0]])


def summarize_main(argv: list[str]) -> int:
    """Rebuild a results directory's summary.csv from its runs.csv and env.json (e.g. after a
    run was interrupted, or when only runs.csv was copied off a machine)."""
    import csv
    import dataclasses
    import json
    from pathlib import Path

    from bench.config import RunConfig
    from bench.results import write_summary
    from bench.runner import summarize_runs

    if len(argv) != 1 or not (Path(argv[0]) / "runs.csv").is_file() or not (Path(argv[0]) / "env.json").is_file():
        print("usage: python -m bench summarize RESULTS_DIR (with runs.csv and env.json)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    saved = json.loads((out / "env.json").read_text())["config"]
    known = {f.name for f in dataclasses.fields(RunConfig)}
    # Options another version of the harness had (added or since removed) do not affect summaries.
    cfg = RunConfig(**{k: v for k, v in saved.items() if k in known})

    def value(text: str):
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

    with (out / "runs.csv").open(newline="") as f:
        rows = [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    path = write_summary(out, summarize_runs(rows, cfg))
    print(f"wrote {path} from {len(rows)} runs")
    return 0


def report_main(argv: list[str]) -> int:
    from bench.report import main as report

    return report(argv)


COMMANDS = {"report": report_main, "run": run_main, "make-checkpoint": make_checkpoint_main, "docs": docs_main, "compare": compare_main,
            "ci-bench": ci_bench_main, "summarize": summarize_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return run_main(argv)

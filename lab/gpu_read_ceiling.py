"""How fast can one kernel read a decoder linear's int4 weights on this GPU, and how far from that
are the W4A16 kernels the benchmark chose at one row?

For each decoder linear shape of a preset (q/k/v and gate/up fused, as the graph engine runs them)
a buffer of the bytes a W4A16 GEMV must read at least (4-bit weights plus an fp16 scale and zero
per group: bench.quant.w4a16.choice.int4_gb_per_s's count) is read by

- `read`: a Triton kernel that only loads the buffer (vectorized, each program a contiguous share)
  and folds it into one word per program, per configuration (words per load, programs per SM,
  warps); the fastest is the ceiling a GEMV over that many bytes can reach in one launch;
- `copy`: torch's device-to-device copy of the buffer (reads and writes it; gb_per_s counts both);
- `fp16 linear`: cuBLAS F.linear of one row by the shape's fp16 weight (what fp16 decode runs;
  gb_per_s counts its 2-byte weights).

Each is timed as the benchmark times kernels (bench.measure.timing.call_us: calls captured in a
CUDA graph, cycling over enough buffers to hold twice the L2 cache, so every call reads from
memory). With `--kernels` (a run's int4_kernels_PRESET.csv), each shape's chosen kernel at one row
is set against the ceiling, and the per-step sums (times the preset's layers) say how much of the
int4 GEMMs' time per decode step a kernel at the ceiling would save.

    python3 lab/gpu_read_ceiling.py --preset llava-1.5-7b --out read_ceiling.csv \\
        --kernels results/reference/h100/llava-1.5-7b-int4-graph-batch/int4_kernels_llava-1.5-7b.csv

Written by hand: no maintained library measures the read rate of one kernel per buffer size.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_int4_candidates import shapes_of  # noqa: E402

from bench.measure.results import CsvWriter  # noqa: E402
from bench.measure.timing import call_us, copies_past_l2  # noqa: E402
from bench.models.presets import get_preset  # noqa: E402

COLUMNS = ["preset", "shape", "out_features", "in_features", "bytes", "way", "config", "us", "gb_per_s"]


@triton.jit
def _read(src, out, n_words, per_program, BLOCK: tl.constexpr):
    """Program p loads words [p * per_program, (p + 1) * per_program) BLOCK at a time and stores
    their exclusive or, so nothing it loads can be left out by the compiler."""
    start = tl.program_id(0) * per_program
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, per_program, BLOCK):
        idx = tl.max_contiguous(tl.multiple_of(start + i + tl.arange(0, BLOCK), BLOCK), BLOCK)
        acc ^= tl.load(src + idx, mask=idx < n_words, other=0)
    tl.store(out + tl.program_id(0), tl.xor_sum(acc, axis=0))


def read_call(buffers: list[torch.Tensor], block: int, programs: int, warps: int):
    """(a function reading the next buffer of `buffers` per call with about `programs` programs,
    the programs it launches)."""
    words = buffers[0].numel()
    per = -(-words // programs)
    per = -(-per // block) * block  # whole loads per program
    grid = (-(-words // per),)
    out = torch.empty(grid[0], dtype=torch.int32, device=buffers[0].device)
    turn = itertools.cycle(buffers)
    return (lambda: _read[grid](next(turn), out, words, per, BLOCK=block, num_warps=warps)), grid[0]


def calls_for(count: int) -> int:
    """Calls per captured graph: at least 32 and a whole number of rounds over `count` buffers, so
    no buffer is read again sooner than after all the others (the L2 cache holds less than them)."""
    return count * -(-32 // count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--kernels", default=None, help="a run's int4_kernels_PRESET.csv: its chosen kernels at one row")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    layers_n = get_preset(args.preset).llm.layers
    writer = CsvWriter(Path(args.out), COLUMNS)
    chosen = _chosen_at_one_row(Path(args.kernels), props.name, args.group_size) if args.kernels else {}
    step = {"read": 0.0, "chosen": 0.0, "read where chosen": 0.0, "fp16 linear": 0.0}
    for shape, (n, k) in shapes_of(args.preset).items():
        nbytes = n * k // 2 + n * (k // args.group_size) * 2 * 2
        count = copies_past_l2(dev, nbytes)
        bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=dev) for _ in range(count)]
        row = {"preset": args.preset, "shape": shape, "out_features": n, "in_features": k, "bytes": nbytes}
        best = None
        for block, per_sm, warps in itertools.product((512, 1024, 2048, 4096), (1, 2, 4, 8), (4, 8)):
            fn, programs = read_call(bufs, block, per_sm * sms, warps)
            us = call_us(fn, dev, calls=calls_for(count))
            config = f"block={block} programs={programs} warps={warps}"
            writer.write({**row, "way": "read", "config": config, "us": round(us, 3),
                          "gb_per_s": round(nbytes / us / 1e3, 1)})
            if best is None or us < best[0]:
                best = (us, config)
        dst = torch.empty_like(bufs[0])
        turn = itertools.cycle(bufs)
        us = call_us(lambda: dst.copy_(next(turn)), dev, calls=calls_for(count))
        writer.write({**row, "way": "copy", "us": round(us, 3), "gb_per_s": round(2 * nbytes / us / 1e3, 1)})
        del bufs
        dst = None  # the copy's buffer, freed
        weights = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
                   for _ in range(copies_past_l2(dev, n * k * 2))]
        x, turn = torch.randn(1, k, device=dev, dtype=torch.float16), itertools.cycle(weights)
        fp16 = call_us(lambda: F.linear(x, next(turn)), dev, calls=calls_for(len(weights)))
        writer.write({**row, "bytes": n * k * 2, "way": "fp16 linear", "us": round(fp16, 3),
                      "gb_per_s": round(n * k * 2 / fp16 / 1e3, 1)})
        del weights
        torch.cuda.empty_cache()
        step["read"] += best[0] * layers_n / 1000
        step["fp16 linear"] += fp16 * layers_n / 1000
        line = (f"{shape:8s} {n}x{k}: read ceiling {best[0]:6.1f} us ({nbytes / best[0] / 1e3:6.0f} GB/s, {best[1]}); "
                f"fp16 linear {fp16:6.1f} us ({n * k * 2 / fp16 / 1e3:6.0f} GB/s)")
        if (n, k) in chosen:
            name, us = chosen[(n, k)]
            step["chosen"] += us * layers_n / 1000
            step["read where chosen"] += best[0] * layers_n / 1000
            line += f"; chosen at 1 row {name} {us:6.1f} us ({us / best[0]:.2f}x the ceiling)"
        print(line, flush=True)
    print(f"per decode step ({layers_n} layers): int4 weights read at the ceiling {step['read']:.3f} ms, "
          f"fp16 linears {step['fp16 linear']:.3f} ms"
          + (f"; the shapes with a chosen kernel: {step['chosen']:.3f} ms chosen against "
             f"{step['read where chosen']:.3f} ms at the ceiling" if chosen else ""))


def _chosen_at_one_row(path: Path, device: str, group_size: int) -> dict:
    """(out, in) -> (kernel, us) the table chose at one row on `device` for `group_size`, timed in
    CUDA graphs without a dense copy (as the graph engine decodes); of several measurements of a
    shape, the one over the most row counts. SystemExit where the table has none for this device
    or two equally wide ones choose differently."""
    import pandas as pd

    t = pd.read_csv(path)
    truth = lambda col: t[col].astype(str).str.lower() == "true"  # noqa: E731
    t = t[(t["device"] == device) & (t["group_size"] == group_size) & truth("graph") & ~truth("dense_copy")
          & (t["rows"] == 1) & truth("chosen")]
    if t.empty:
        sys.exit(f"{path}: no kernel chosen at one row on {device} (group {group_size}, graphs, no dense copy)")
    width = t["points"].astype(str).str.split().str.len() if "points" in t else pd.Series(0, index=t.index)
    t = t.assign(width=width)
    out = {}
    for (n, k), g in t.groupby(["out_features", "in_features"]):
        widest = g[g["width"] == g["width"].max()]
        if widest["kernel"].nunique() > 1:
            sys.exit(f"{path}: {n}x{k} has measurements over as many row counts that chose "
                     f"{', '.join(sorted(widest['kernel'].unique()))} at one row; give a table of one run")
        out[(int(n), int(k))] = (widest["kernel"].iloc[0], float(widest["us"].iloc[0]))
    return out


if __name__ == "__main__":
    main()

"""Does every configuration the tiles kernel's autotuner keeps compile for sm_90, and what does it
hold in registers? (No GPU needed: bench.quant.triton_aot.)

For the decoder linears of llava-1.5-7b and vila1.5-3b, each row block (1, 2, 4 rows elementwise,
16 on tl.dot), group size, activation dtype and split-K or not, the configurations
bench.quant.triton_w4a16._prune keeps are compiled once each (a kernel depends on the shape only
through what the autotuner keeps and the arguments' divisibility, the same for all these shapes),
and one line per compile says ok or the error, registers, spill bytes and shared memory, and the
machine instructions of its K loop (cuobjdump's SASS): in all, per weight a thread takes per step,
int -> float conversions among them, and the most frequent. At a few rows the kernel is bound by
the instructions it issues per weight: an SM issues at most 128 thread-instructions a cycle, and
int4 weights streamed at 4 TB/s over an H200's 132 SMs at 1.98 GHz are 8e12 a second, 31 per SM
and cycle, so 4 instructions per weight at most (fewer for the half-rate integer ones).

    python lab/triton_tiles_aot.py [--capability 90] [--groups 128 64] [--out table.csv]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.quant import triton_aot  # noqa: E402
from bench.quant import triton_w4a16 as tw  # noqa: E402

SHAPES = {  # (N, K) of the decoder's linears, q/k/v and gate/up fused
    "llava-1.5-7b": ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)),
    "vila1.5-3b": ((7680, 2560), (2560, 2560), (13824, 2560), (2560, 6912)),
}
ROWS = {1: 1, 2: 2, 4: 4, 16: 16}  # row block -> a row count launching it


def kept(split: bool, rows: int) -> dict[tuple, list[str]]:
    """Each configuration the autotuner keeps for some shape -> the shapes keeping it."""
    out: dict[tuple, list[str]] = {}
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            for c in tw._prune(tw._configs(split), {"N": n, "K": k, "BLOCK_M": tw.rows_block(rows)}):
                key = (c.kwargs["TN"], c.kwargs["BKT"], c.kwargs["SPLIT_K"], c.num_warps, c.num_stages)
                out.setdefault(key, []).append(f"{n}x{k}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--out", help="also write the table as CSV here")
    args = p.parse_args(argv)
    why = triton_aot.unavailable(args.capability)
    if why:
        print(why, file=sys.stderr)
        return 2
    table = []
    for split in (False, True):
        for block, rows in ROWS.items():
            for (tn, bkt, sk, warps, stages), shapes in sorted(kept(split, rows).items()):
                for g in args.groups:
                    for dt in args.dtypes:
                        cfg = {"TN": tn, "BKT": bkt, "SPLIT_K": sk, "num_warps": warps, "num_stages": stages}
                        row = {"split": split, "block_m": block, "tn": tn, "bkt": bkt, "split_k": sk,
                               "warps": warps, "stages": stages, "group": g, "dtype": dt,
                               "shapes": len(shapes)}
                        try:
                            c = triton_aot.compile_tiles(rows, 4096, 4096, g, getattr(torch, dt), split, cfg,
                                                         args.capability)
                            loop = triton_aot.loop_instructions(c.cubin, args.capability)
                            per_thread = tn * 8 * bkt * 128 // (warps * 32)  # weights a thread takes per step
                            row.update(result="ok", regs=c.registers, spill_bytes=c.spill_bytes,
                                       shared=c.shared_bytes, loop_instructions=sum(loop.values()),
                                       per_weight=round(sum(loop.values()) / per_thread, 2),
                                       int_to_float=loop["I2F"] + loop["I2FP"],
                                       top=" ".join(f"{k}:{v}" for k, v in loop.most_common(6)))
                        except Exception as e:  # noqa: BLE001 - the table reports each compile error
                            row.update(result=f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                                       regs="", spill_bytes="", shared="", loop_instructions="", per_weight="",
                                       int_to_float="", top="")
                        table.append(row)
                        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return 1 if any(r["result"] != "ok" for r in table) else 0


if __name__ == "__main__":
    print(f"Triton {triton.__version__}", file=sys.stderr)
    sys.exit(main())

"""W4A16 kernels against fp16 per decoder weight shape and row count, measured as the benchmark's
`--int4-kernels measured` measures them, without loading a model.

For each decoder linear shape of a preset (q/k/v and gate/up fused, as the graph engine runs them)
random weights are quantized to int4 (group 128) in enough layers to hold twice the GPU's L2 cache;
bench.quant.w4a16.choice.measure times each candidate captured in CUDA graphs, cycling over those
layers, and checks it against the dequantized weight. fp16 is cuBLAS F.linear on as many fp16
weights of the shape, timed the same way (bench.measure.timing.call_us). The table adds the
fastest correct kernel per point against fp16, and `per_token_ms`: the fastest correct kernel per
shape times the preset's layer count (the decode linears' floor for one step at that row count).

    python3 lab/gpu_w4a16_table.py --preset llava-1.5-7b --candidates marlin,dense --out w4a16.csv
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_int4_candidates import shapes_of  # noqa: E402

from bench.measure.results import CsvWriter  # noqa: E402
from bench.measure.timing import call_us, copies_past_l2  # noqa: E402
from bench.models.presets import get_preset  # noqa: E402
from bench.quant.int4 import Int4Linear, quantize_int4  # noqa: E402
from bench.quant.w4a16 import choice  # noqa: E402

COLUMNS = ["shape", "out_features", "in_features", "kernel", "rows", "us", "int4_gb_per_s", "vs_fp16",
           "max_rel_err", "left_out"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--candidates", default="marlin,dense", help="W4A16 kernels to time (registry names)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.float16
    names = [n for n in args.candidates.split(",") if n]
    writer = CsvWriter(Path(args.out), COLUMNS)
    layers_n = get_preset(args.preset).llm.layers
    floor: dict[int, float] = {}
    gen = torch.Generator().manual_seed(0)
    for shape, (n, k) in shapes_of(args.preset).items():
        count = copies_past_l2(dev, n * k // 2)
        layers = [Int4Linear.from_int4(quantize_int4(torch.randn(n, k, generator=gen) * 0.02, args.group_size),
                                       dev, dtype) for _ in range(count)]
        plan = choice.measure(layers[0], dtype, choice.ROW_POINTS, names, True, layers)
        dense_w = [m.to_int4().dequantize(dtype).to(dev) for m in layers[:copies_past_l2(dev, n * k * 2)]]
        del layers
        for rows in choice.ROW_POINTS:
            x = torch.randn(rows, k, device=dev, dtype=dtype)
            turn = itertools.cycle(dense_w)
            fp16 = call_us(lambda x=x, turn=turn: F.linear(x, next(turn)), dev, calls=max(32, len(dense_w)))
            writer.write({"shape": shape, "out_features": n, "in_features": k, "kernel": "fp16", "rows": rows,
                          "us": round(fp16, 3), "vs_fp16": 1.0})
            best = None
            for name in plan.us:
                us, err = plan.us[name].get(rows), plan.err[name].get(rows)
                if us is None:
                    continue
                writer.write({"shape": shape, "out_features": n, "in_features": k, "kernel": name, "rows": rows,
                              "us": round(us, 3), "int4_gb_per_s": round(choice.int4_gb_per_s(n, k, args.group_size, us)),
                              "vs_fp16": round(us / fp16, 3), "max_rel_err": f"{err:.2e}"})
                if err <= choice.TOLERANCE and (best is None or us < best[0]):
                    best = (us, name)
            if best:
                floor[rows] = floor.get(rows, 0.0) + best[0] * layers_n / 1000
                print(f"{shape:8s} {n}x{k} rows={rows:3d} fp16 {fp16:7.1f} us  best {best[1]} {best[0]:7.1f} us "
                      f"({fp16 / best[0]:.2f}x)", flush=True)
        for name, why in plan.left_out.items():
            writer.write({"shape": shape, "out_features": n, "in_features": k, "kernel": name, "left_out": why})
            print(f"{shape}: {name} left out: {why}", flush=True)
        del dense_w
        torch.cuda.empty_cache()
    for rows, ms in floor.items():
        print(f"per_token_ms rows={rows}: {ms:.3f} (fastest correct kernel per shape x {layers_n} layers)")


if __name__ == "__main__":
    main()

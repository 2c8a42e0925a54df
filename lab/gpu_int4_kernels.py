"""Per-linear cost of the int4 paths against fp16, by rows M (what --int4-dense-rows trades).

For each weight shape of a preset's decoder and each M: cuBLAS fp16 F.linear; our Int4Linear's
int4 path (PyTorch's tinygemm, as torchao's int4 tensors call it, with the casts our fp16 model
needs); torchao's own Int4WeightOnlyConfig(tile_packed_to_4d) linear on bf16 input; our dense
path (Triton dequantize + cuBLAS GEMM) and the dequantize alone, by the kernel that assumes the
published tinygemm layout (what runs) and by the one that reads the learnt layout. Each is
captured 50 times in one CUDA graph and replayed, so the numbers are GPU time without launch
overhead; median of 15.

    python lab/gpu_int4_kernels.py --preset llava-1.5-7b --out int4_kernels_llava-1.5-7b.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import graphed_us  # noqa: E402

from bench.models.presets import get_preset  # noqa: E402
from bench.quant import triton_int4  # noqa: E402
from bench.quant.int4 import Int4Linear, quantize_int4  # noqa: E402
from bench.measure.results import CsvWriter  # noqa: E402

REPS = 50


def torchao_int4(w: torch.Tensor, group: int):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError:
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    quantize_(lin, Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"))
    return lin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.float16
    llm = get_preset(args.preset).llm
    shapes = {"q/o": (llm.hidden, llm.hidden), "gate/up": (llm.mlp, llm.hidden), "down": (llm.hidden, llm.mlp)}
    if llm.kv_heads != llm.heads:
        shapes["k/v"] = (llm.kv_heads * (llm.hidden // llm.heads), llm.hidden)
    writer = CsvWriter(Path(args.out), ["preset", "linear", "out_features", "in_features", "rows", "path", "us",
                                        "vs_fp16"])
    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
        layer = Int4Linear.from_int4(quantize_int4(w, args.group_size), dev, dtype)
        print(f"{name}: int4 scales stored as {layer.scale_and_zero.dtype}, published tile layout: "
              f"{layer.published_layout}", flush=True)
        ao = torchao_int4(w, args.group_size)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            paths = {"fp16": lambda: F.linear(x, w)}
            if ao is not None:
                xb = x.to(torch.bfloat16)
                paths["torchao_tinygemm_bf16"] = lambda: ao(xb)
            layer.dense_rows = 10**9
            paths["int4_kernel"] = lambda: layer(x)
            paths["int4_dense"] = lambda: F.linear(x, layer.dense_weight(dtype))  # what layer(x) runs above dense_rows
            if m == 1:
                paths["dequantize_only"] = lambda: layer.dense_weight(dtype)  # the published-layout kernel
                gathered = torch.empty(n, k, device=dev, dtype=dtype)
                paths["dequantize_gather"] = lambda: triton_int4.dequantize_tinygemm(  # the learnt-layout kernel
                    layer.packed, layer.scale_and_zero, layer.tile_inverse, gathered, args.group_size, False)
            times = {p: graphed_us(fn, calls=REPS, reps=15) for p, fn in paths.items()}
            for p, us in times.items():
                writer.write({"preset": args.preset, "linear": name, "out_features": n, "in_features": k, "rows": m,
                              "path": p, "us": round(us, 2), "vs_fp16": round(us / times["fp16"], 3)})
            print(f"{name:8s} M={m:4d}  " + "  ".join(f"{p} {us:7.1f}" for p, us in times.items()), flush=True)
    writer.close()


if __name__ == "__main__":
    main()

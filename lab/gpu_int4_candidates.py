"""Which W4A16 kernel is fastest per decoder linear and row count, and is it right?

The candidates a measured kernel choice would pick from (issue: int4 at the bandwidth limit),
on the weight shapes the graph engine runs (q/k/v and gate/up fused, as
bench.engines.fused_linear makes them; o and down alone), for each row count M:

- fp16: cuBLAS F.linear on the dense weight (the bar to beat);
- tinygemm: Int4Linear's int4 path (PyTorch's `_weight_int4pack_mm`, what runs today);
- dense: Int4Linear's prefill path (Triton dequantize + cuBLAS);
- gemlite/<setting>/<kernel>: gemlite's GemLiteLinear on the same int4 codes, scales and zero
  points (packed with fma_mode=False: (q - z) * s as ours), for each packing width (32, 8), each autotune
  setting (`default`: its defaults, no config for an H200; `h100`: its shipped H100 config;
  `max`: its exhaustive autotune) and each of its kernels forced by forward_manual, plus `auto`
  (its own pick by M).

Every candidate's output is checked against the dequantized weight times x in fp32
(`max_rel_err`); a candidate that raises gets a row with the error, and the sweep goes on.
Times: each call captured 50 times in one CUDA graph and replayed (GPU time, no launch
overhead), median of 15. `per_token_ms` in the summary scales the fastest correct candidate per
shape by the preset's layer count: the decode linears' floor for one token.

    python3 lab/gpu_int4_candidates.py --preset llava-1.5-7b --out int4_candidates_llava-1.5-7b.csv
    python3 lab/gpu_int4_candidates.py --gemlite-settings max --gemlite-packing 32 --rows 1,4,16 --out ...
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import graphed_us  # noqa: E402

from bench.measure.results import CsvWriter  # noqa: E402
from bench.models.presets import get_preset  # noqa: E402
from bench.quant.int4 import Int4Linear, quantize_int4  # noqa: E402

REPS = 50
GEMLITE_KERNELS = ("auto", "GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK", "GEMM_SPLITK", "GEMM")


def shapes_of(preset: str) -> dict[str, tuple[int, int]]:
    llm = get_preset(preset).llm
    head = llm.hidden // llm.heads
    return {"qkv": ((llm.heads + 2 * llm.kv_heads) * head, llm.hidden), "o": (llm.hidden, llm.hidden),
            "gate_up": (2 * llm.mlp, llm.hidden), "down": (llm.hidden, llm.mlp)}


def gemlite_layers(t, n: int, k: int, dtype, dev, settings: list[str], widths: list[int]) -> dict:
    """GemLiteLinear modules on the int4 codes of `t` per (packing width, autotune setting);
    {} without gemlite."""
    try:
        import gemlite
        from gemlite import DType, GemLiteLinear
    except ImportError as e:
        print(f"gemlite not importable ({e}); its rows are left out", flush=True)
        return {}
    h100 = Path(gemlite.__file__).parent / "configs" / "h100.json"
    out = {}
    for bits in widths:
        for setting in settings:
            gemlite.reset_config()
            if setting == "h100" and h100.is_file():
                gemlite.load_config(str(h100))
            gemlite.set_autotune("max" if setting == "max" else "fast")
            gemlite.set_packing_bitwidth(bits)
            layer = GemLiteLinear(4, group_size=t.group_size, in_features=k, out_features=n,
                                  input_dtype=DType.FP16, output_dtype=DType.FP16)
            layer.pack(t.q.to(dev, torch.uint8), t.scale.to(dev, dtype), t.zero.to(dev, dtype), None, fma_mode=False)
            out[f"p{bits}/{setting}"] = layer
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--gemlite-settings", default="default,h100", help="of default,h100,max (max autotunes "
                    "exhaustively: minutes per shape)")
    ap.add_argument("--gemlite-packing", default="32,8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.float16
    rows = [int(r) for r in args.rows.split(",")]
    writer = CsvWriter(Path(args.out), ["preset", "linear", "out_features", "in_features", "rows", "candidate",
                                        "us", "vs_fp16", "max_rel_err", "error"])
    best: dict[tuple[str, int], tuple[float, str]] = {}
    torch.manual_seed(0)
    for name, (n, k) in shapes_of(args.preset).items():
        t = quantize_int4(torch.randn(n, k) * 0.02, args.group_size)
        w = t.dequantize(torch.float32).to(dev)
        w16 = w.to(dtype)
        layer = Int4Linear.from_int4(t, dev, dtype)
        gl = gemlite_layers(t, n, k, dtype, dev, args.gemlite_settings.split(","),
                            [int(b) for b in args.gemlite_packing.split(",")])
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            want = x.float() @ w.t()
            paths = {"fp16": lambda: F.linear(x, w16)}

            layer.dense_rows = 10**9
            paths["tinygemm"] = lambda: layer(x)
            paths["dense"] = lambda: F.linear(x, layer.dense_weight(dtype))  # what layer(x) runs above dense_rows
            for setting, g in gl.items():
                for kern in GEMLITE_KERNELS:
                    paths[f"gemlite/{setting}/{kern}"] = ((lambda g=g: g(x)) if kern == "auto" else
                                                          (lambda g=g, kern=kern: g.forward_manual(x, kern)))
            fp16_us = None
            for cand, fn in paths.items():
                row = {"preset": args.preset, "linear": name, "out_features": n, "in_features": k, "rows": m,
                       "candidate": cand}
                try:
                    got = fn()  # also runs the candidate's autotuning, before any capture
                    torch.cuda.synchronize()
                    err = ((got.float() - want).abs().max() / want.abs().max()).item()
                    us = graphed_us(fn, calls=REPS, reps=15)
                except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a row saying why
                    writer.write({**row, "error": " ".join(f"{e.__class__.__name__}: {e}".split())[:300]})
                    traceback.print_exc(limit=1)
                    torch.cuda.synchronize()
                    continue
                fp16_us = us if cand == "fp16" else fp16_us
                writer.write({**row, "us": round(us, 2), "vs_fp16": round(us / fp16_us, 3),
                              "max_rel_err": f"{err:.2e}"})
                if cand != "fp16" and err < 2e-2 and us < best.get((name, m), (float("inf"), ""))[0]:
                    best[(name, m)] = (us, cand)
            print(f"{name:8s} M={m:3d} best {best.get((name, m))} fp16 {fp16_us:.1f} us", flush=True)
    writer.close()
    layers = get_preset(args.preset).llm.layers
    for m in rows:
        total = sum(best[(name, m)][0] for name in shapes_of(args.preset) if (name, m) in best)
        print(f"M={m:3d}: fastest correct int4 candidates, decoder linears per token {total * layers / 1e3:.2f} ms",
              flush=True)


if __name__ == "__main__":
    main()

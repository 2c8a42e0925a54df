"""Where the graph engine's full-prompt prefill spends host and GPU time with int4 weights
against fp16 (H200): wall time (CUDA events around the prefill), summed kernel time, and the
host-side ops that take the most CPU time (torch.profiler), for
- fp16 weights,
- rtn4 weights with the prefill's dense path traced into the compiled layer (the default),
- rtn4 weights with the dense path as the opaque custom op (what the eager path runs).
rtn4 and awq4 run the same kernels; rtn4 needs no calibration.

    python lab/gpu_int4_prefill_profile.py --preset vila1.5-3b --out $OUT/int4_prefill_profile_vila1.5-3b.csv

--kernels-out also writes each configuration's kernels by name (ms and launches per prefill), so
fp16's and int4's prefill can be set side by side kernel by kernel (the dequantize kernels, the
GEMMs on the dequantized weights, and what is common to both).
"""
from __future__ import annotations

import gc
import statistics
from pathlib import Path

import torch

from gpu_profile_common import QUESTION, demo_image, event_times_ms, kernel_times, preset_adapter, profile_parser

from bench.engines.cache_policy import CachePolicy
from bench.quant.int4 import Int4Linear
from bench.measure.results import CsvWriter
from bench.engines.graph import GraphEngine


def trace_dense(engine, on: bool) -> None:
    """Every int4 linear of the engine's model and decoder (its fused groups) traces the dense
    path when compiled (`Int4Linear.trace_dense`), or calls the opaque op."""
    for module in (*engine.adapter.model.modules(), *engine.decoder.modules()):
        if isinstance(module, Int4Linear):
            module.trace_dense = on


def host_ops(fn, reps: int, top: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return "; ".join(f"{e.self_cpu_time_total / reps / 1e3:.2f} ms {e.count // reps}x {e.key[:60]}" for e in rows)


def main() -> None:
    ap = profile_parser("vila1.5-3b")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernels-out", default=None, help="a CSV of every kernel per configuration")
    args = ap.parse_args()
    image = demo_image()
    w = CsvWriter(Path(args.out), ["model", "weights", "dense_path", "tokens", "wall_ms", "kernel_ms", "top_host_ops"])
    kw = CsvWriter(Path(args.kernels_out), ["model", "weights", "dense_path", "kernel", "ms", "launches"]) \
        if args.kernels_out else None
    for weights, traced in (("fp16", True), ("rtn4", True), ("rtn4", False)):
        adapter = preset_adapter(args.preset, weights)
        engine = GraphEngine(adapter, CachePolicy())
        trace_dense(engine, traced)  # read when the layer compiles (the engine reset dynamo)
        with torch.inference_mode():
            p = adapter.prepare(image, QUESTION)
            embeds = adapter.prompt_embeds(p, adapter.encode_image(adapter.pixels_to_device(p)))
            cache = engine.new_cache(embeds.shape[1], 8)
            call = lambda: engine.prefill(embeds, cache, 0)[:, -1].argmax(-1)  # noqa: E731
            for _ in range(3):
                call()
            wall = statistics.median(event_times_ms(call, args.reps))
            per_kernel = kernel_times(call, 5)
            kernels = sum(ms for ms, _ in per_kernel.values())
            ops = host_ops(call, 5)
        path = "-" if weights == "fp16" else ("traced Triton dequantize" if traced else "opaque custom op")
        for name, (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]) if kw is not None else ():
            kw.write({"model": args.preset, "weights": weights, "dense_path": path, "kernel": name[:160],
                      "ms": ms, "launches": n})
        w.write({"model": args.preset, "weights": weights, "dense_path": path, "tokens": embeds.shape[1],
                 "wall_ms": wall, "kernel_ms": kernels, "top_host_ops": ops})
        print(f"{weights:5s} {path:26s} {embeds.shape[1]} tokens: wall {wall:.2f} ms, kernels {kernels:.2f} ms | {ops}",
              flush=True)
        trace_dense(engine, True)
        engine = adapter = cache = embeds = None
        gc.collect()
        torch.cuda.empty_cache()
    w.close()
    if kw is not None:
        kw.close()


if __name__ == "__main__":
    main()

"""Does programmatic dependent launch (`--pdl auto`) shorten the graph engine's decode step? Both
settings in one process, alternated round by round (a process's step varies by a few percent from
the next one's, so two processes decide nothing), for fp16 and int4 (rtn4) weights of one preset:
each round makes a new graph engine per weights and setting (compiled and captured afresh), runs
one request and records its decode steps' median. Writes one CSV row per round, weights and setting.

    python lab/gpu_pdl_ab.py --preset llava-1.5-7b --rounds 3 --out $OUT/pdl_ab_llava-1.5-7b.csv

--int4-kernels as run's flag (default triton-f16x2: what `measured` chooses at one row on every
decoder shape of llava-1.5-7b and vila1.5-3b on an H100); --seconds stops starting rounds after that
long (the rounds finished are written as they finish).
"""
from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

from gpu_profile_common import QUESTION, demo_image, preset_adapter, profile_parser

from bench.engines.cache_policy import CachePolicy
from bench.engines.graph import GraphEngine
from bench.engines.spec import EngineSpec
from bench.measure.results import CsvWriter


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=float("inf"))
    ap.add_argument("--weights", default="fp16,rtn4")
    ap.add_argument("--int4-kernels", default="triton-f16x2")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    image = demo_image()
    adapters = {weights: preset_adapter(args.preset, weights) for weights in args.weights.split(",")}
    w = CsvWriter(Path(args.out), ["model", "weights", "int4_kernels", "round", "pdl", "pdl_on", "step_ms",
                                   "step_ms_p10", "step_ms_p90", "steps"])
    start = time.monotonic()
    for rnd in range(args.rounds):
        if time.monotonic() - start > args.seconds:
            break
        modes = ("off", "auto") if rnd % 2 == 0 else ("auto", "off")  # neither always first
        for weights, adapter in adapters.items():
            for mode in modes:
                torch._dynamo.reset()
                spec = EngineSpec(pdl=mode, int4_kernels=args.int4_kernels)
                engine = GraphEngine(adapter, CachePolicy(), spec)
                engine.run_batch([(image, QUESTION)], args.new_tokens)  # compiled and captured here
                steps = sorted(engine.run_batch([(image, QUESTION)], args.new_tokens).step_ms)
                q = statistics.quantiles(steps, n=10)
                row = {"model": args.preset, "weights": weights,
                       "int4_kernels": args.int4_kernels if weights != "fp16" else "", "round": rnd,
                       "pdl": mode, "pdl_on": engine.pdl, "step_ms": statistics.median(steps),
                       "step_ms_p10": q[0], "step_ms_p90": q[-1], "steps": len(steps)}
                w.write(row)
                print(f"round {rnd} {weights} pdl={mode}: {row['step_ms']:.3f} ms "
                      f"(p10 {q[0]:.3f}, p90 {q[-1]:.3f}, {len(steps)} steps)", flush=True)
                del engine
                gc.collect()
                torch.cuda.empty_cache()
    w.close()


if __name__ == "__main__":
    main()

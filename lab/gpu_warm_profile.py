"""Where a warm prefix request's TTFT goes on the graph engine: each phase's median (host and
CUDA events, as the benchmark times them), the CUDA kernels of one warm request up to its first
token, and the host functions that take the most time (cProfile).

    python lab/gpu_warm_profile.py --preset llava-1.5-7b --out $OUT/warm_profile_llava-1.5-7b.csv
        [--engine graph-exact] [--conditions 1]  (the first N run-loop conditions only)
"""
from __future__ import annotations

import cProfile
import gc
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

from gpu_profile_common import QUESTION, demo_image, kernel_times, profile_parser, suffix_graph_replays

from bench.run.config import DEMO_IMAGE
from bench.run.monitors import GpuMonitor
from bench.models.loader import build_preset
from bench.measure.results import CsvWriter
from bench.models.visual import VisualInput
from variants import registry
from variants.prefix import PrefixKVPolicy

QUESTIONS = ["What is shown in this image?", "Describe the colors in this picture.", "Is there any text here?",
             "What could happen next?"]


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--engine", default="graph", choices=["graph", "graph-exact"])
    ap.add_argument("--conditions", type=int, default=None, help="run only the first N run-loop conditions")
    args = ap.parse_args()
    image = demo_image()
    visual = VisualInput((image,), encoded=(Path(DEMO_IMAGE).read_bytes(),))  # as the benchmark's requests
    adapter = build_preset(args.preset, None, torch.device("cuda"), torch.float16)
    engine = registry()[args.engine].make_engine(adapter, PrefixKVPolicy(4096))
    engine.run(visual, QUESTION, 4)  # cold: stores the prefix, captures the graphs
    for q in QUESTIONS * 2:
        engine.run(visual, q, 2)  # warm: suffix bucket graphs captured
    w = CsvWriter(Path(args.out), ["model", "engine", "what", "name", "ms", "launches"])
    who = {"model": args.preset, "engine": args.engine}
    monitor = GpuMonitor(torch.cuda.current_device())
    # What the benchmark's run loop does around each request, one piece at a time: which of
    # them (if any) moves a warm request's phases?
    conditions = {
        "bare, 2 new tokens": dict(tokens=2),
        "bare, 128 new tokens": dict(tokens=128),
        "2 new tokens, host sleeps 0.6 s before each": dict(tokens=2, sleep=0.6),
        "2 new tokens, host spins 0.6 s before each": dict(tokens=2, spin=0.6),
        "full gc.collect() before each": dict(tokens=128, gc="full"),
        "gc.collect(1) before each": dict(tokens=128, gc="young"),
        "NVML monitor around each": dict(tokens=128, monitor=True),
        "as the benchmark (full gc + monitor)": dict(tokens=128, gc="full", monitor=True),
    }
    for label, c in list(conditions.items())[:args.conditions]:
        phases: dict[str, list[float]] = {}
        for i in range(args.reps):
            torch.cuda.synchronize()
            if c.get("sleep"):
                time.sleep(c["sleep"])
            if c.get("spin"):
                until = time.perf_counter() + c["spin"]
                while time.perf_counter() < until:
                    pass
            if c.get("gc"):
                gc.collect(*(() if c["gc"] == "full" else (1,)))
            gc.disable()
            if c.get("monitor"):
                monitor.start()
            r = engine.run(visual, QUESTIONS[0], c["tokens"])
            if c.get("monitor"):
                monitor.stop()
            gc.enable()
            for k, v in r.phases_ms.items():
                phases.setdefault(k, []).append(v)
        parts = []
        for k in ("preprocess", "lookup", "restore", "prefill"):
            ms = statistics.median(phases.get(k, [0.0]))
            parts.append(f"{k} {ms:.3f}")
            w.write({**who, "what": f"warm phase median: {label}", "name": k, "ms": ms, "launches": ""})
        ttfts = [sum(p) for p in zip(*(phases[k] for k in ("preprocess", "lookup", "restore", "prefill")))]
        w.write({**who, "what": f"warm phase median: {label}", "name": "ttft (median of sums)",
                 "ms": statistics.median(ttfts), "launches": ""})
        print(f"{label:40s} TTFT {statistics.median(ttfts):.3f} ms | " + ", ".join(parts), flush=True)
    prefix_len = engine.run(visual, QUESTIONS[0], 1).cached_tokens
    for key, (_, walls) in suffix_graph_replays(engine, prefix_len).items():  # each suffix graph alone
        w.write({**who, "what": "suffix graph replay alone", "name": f"bucket {key[1]} keys {key[2]}",
                 "ms": statistics.median(walls), "launches": ""})
        print(f"suffix graph (bucket {key[1]}) replay alone: {statistics.median(walls):.3f} ms", flush=True)
    one = lambda: engine.run(visual, QUESTIONS[1], 1)  # noqa: E731 - up to the first token only
    kernels = kernel_times(one, 5)
    total = sum(ms for ms, _ in kernels.values())
    print(f"kernels of one warm request to its first token: {total:.3f} ms", flush=True)
    for name, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]:
        w.write({**who, "what": "warm request kernel", "name": name[:160], "ms": ms, "launches": n})
        print(f"  {ms:7.3f} ms {n:5.0f}x {name[:100]}", flush=True)
    w.write({**who, "what": "warm request kernels total", "name": "", "ms": total, "launches": ""})
    prof = cProfile.Profile()
    prof.enable()
    for i in range(20):
        one()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue(), flush=True)
    w.close()


if __name__ == "__main__":
    main()

"""How long does a request's image processing take, by where the processor runs (host or the
GPU), torch's CPU thread count and the garbage-collection discipline around requests?

Each condition processes the demo image `--iterations` times, as requests would: between two
of them a stand-in request makes ~60k short-lived Python objects (some in reference cycles), as
a request's bookkeeping does, with the model's heap alive. Disciplines:
  full-before-each: gc.collect() before each request, collector off during it (timeit's way);
  freeze: gc.collect() + gc.freeze() once, collector off during a request, young generation
          collected after it (bench.run.host).

    python3 lab/gpu_host_gc.py --preset vila1.5-3b --out $OUT/host_gc_vila1.5-3b.csv
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from bench.measure.results import CsvWriter
from bench.models.loader import build_preset
from bench.models.visual import load_image
from bench.run.config import DEMO_IMAGE


def stand_in_request() -> None:
    nodes = [{"i": i, "payload": [i] * 3} for i in range(20_000)]
    for a, b in zip(nodes[::2], nodes[1::2]):  # cycles: only the collector frees these
        a["peer"], b["peer"] = b, a
    del nodes


def measure(adapter, image, place: str, threads: int, discipline: str, iterations: int) -> list[float]:
    torch.set_num_threads(threads)
    adapter.preprocess_device = torch.device("cuda") if place == "cuda" else None
    gc.unfreeze()
    gc.collect()
    if discipline == "freeze":
        gc.freeze()
    out = []
    for _ in range(iterations):
        stand_in_request()
        if discipline == "full-before-each":
            gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        adapter.preprocess(image)  # waits for device work itself (VLMAdapter.run_processor)
        out.append((time.perf_counter() - t0) * 1e3)
        gc.enable()
        if discipline == "freeze":
            gc.collect(0)
    gc.unfreeze()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vila1.5-3b")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    adapter = build_preset(args.preset, None, torch.device("cuda"), torch.float16)
    image = load_image(str(DEMO_IMAGE))
    processor = type(adapter.image_processor).__name__
    default_threads = torch.get_num_threads()
    writer = CsvWriter(Path(args.out), ["preset", "processor", "place", "threads", "gc", "iteration", "preprocess_ms"])
    for place in ("cpu", "cuda"):
        for threads in sorted({default_threads, 1}, reverse=True):
            for discipline in ("full-before-each", "freeze"):
                measure(adapter, image, place, threads, discipline, 5)  # warm the path
                xs = measure(adapter, image, place, threads, discipline, args.iterations)
                for i, ms in enumerate(xs):
                    writer.write({"preset": args.preset, "processor": processor, "place": place, "threads": threads,
                                  "gc": discipline, "iteration": i, "preprocess_ms": round(ms, 4)})
                q = statistics.quantiles(xs, n=10)
                print(f"{args.preset} {processor} {place:4} threads={threads:2} {discipline:17} "
                      f"median {statistics.median(xs):6.2f} ms  p90 {q[-1]:6.2f} ms  max {max(xs):6.2f} ms",
                      flush=True)
    writer.close()


if __name__ == "__main__":
    main()

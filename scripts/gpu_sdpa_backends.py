"""What each SDPA backend costs for the graph engine's attention shapes (H200): t queries of one
row over a static KV buffer of `keys` columns with an additive mask (the decode step t=1 and the
suffix buckets), 32 heads x 128, fp16. Each backend's calls are captured in a CUDA graph of 32
calls (one per layer) and replayed, so launch overhead is excluded as in the engine.

    python scripts/gpu_sdpa_backends.py --out $OUT/sdpa_backends.csv
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import CsvWriter  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def per_call_us(backend, q, k, v, mask, layers=32, reps=20) -> float:
    with sdpa_kernel([backend]):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(layers):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / layers)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    w = CsvWriter(Path(args.out), ["queries", "keys", "backend", "us_per_call"])
    dev, dt = torch.device("cuda"), torch.float16
    for t in (1, 16, 32, 64):
        for keys in (768, 1024, 2048, 4096):
            q = torch.randn(1, 32, t, 128, device=dev, dtype=dt)
            k, v = (torch.randn(1, 32, keys, 128, device=dev, dtype=dt) for _ in range(2))
            length = keys - 200  # tokens written so far; the rest of the buffer is masked
            cols = length + torch.arange(t, device=dev)
            allowed = torch.arange(keys, device=dev)[None, :] <= cols[:, None]
            mask = torch.zeros(t, keys, device=dev, dtype=dt).masked_fill_(~allowed, float("-inf"))
            for name, backend in BACKENDS.items():
                try:
                    us = per_call_us(backend, q, k, v, mask)
                except RuntimeError as e:
                    print(f"t={t} keys={keys} {name}: unavailable ({str(e)[:80]})", flush=True)
                    continue
                w.write({"queries": t, "keys": keys, "backend": name, "us_per_call": us})
                print(f"t={t:3d} keys={keys:5d} {name:10s} {us:7.2f} us", flush=True)
    w.close()


if __name__ == "__main__":
    main()

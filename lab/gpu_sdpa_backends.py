"""What each SDPA backend costs for the graph engine's attention shapes (H200): t queries of one
row over a static KV buffer of `keys` columns with an additive mask (the decode step t=1 and the
suffix buckets), 32 heads x 128, fp16: the SDPA backends, and `matmul_compiled` (the graph
engine's compiled attention for several queries, FastDecoder._matmul_attention). Each one's
calls are captured in a CUDA graph of 32 calls (one per layer) and replayed, so launch overhead
is excluded as in the engine.

    python lab/gpu_sdpa_backends.py --out $OUT/sdpa_backends.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import compiled_matmul_attention, graphed_us  # noqa: E402

from bench.measure.results import CsvWriter  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def per_call_us(backend, q, k, v, mask) -> float:
    with sdpa_kernel([backend]):
        return graphed_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def matmul_attention_us(q, k, v, mask) -> float:
    """FastDecoder._matmul_attention compiled as the graph engine's steps compile it."""
    fn = compiled_matmul_attention(q.shape[1], k.shape[1], q.shape[-1])
    return graphed_us(lambda: fn(q, k, v, mask))


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
            runs = {name: (lambda b=backend: per_call_us(b, q, k, v, mask)) for name, backend in BACKENDS.items()}
            runs["matmul_compiled"] = lambda: matmul_attention_us(q, k, v, mask)
            for name, run in runs.items():
                try:
                    us = run()
                except RuntimeError as e:
                    print(f"t={t} keys={keys} {name}: unavailable ({str(e)[:80]})", flush=True)
                    continue
                w.write({"queries": t, "keys": keys, "backend": name, "us_per_call": us})
                print(f"t={t:3d} keys={keys:5d} {name:10s} {us:7.2f} us", flush=True)
    w.close()


if __name__ == "__main__":
    main()

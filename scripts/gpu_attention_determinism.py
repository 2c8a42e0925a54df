"""Does one decode-attention call give the same output when repeated? Per SDPA backend, for the
call transformers makes (one query over exactly the keys so far, no mask) and the one the static
engines make (one query over a fixed KV buffer, additive mask), plus the compiled matmul attention
of the graph engine's steps: of `--reruns` repeats of the identical call, how many differ from
the first and in how many elements; and the call's time inside a CUDA graph (median, us).

    python scripts/gpu_attention_determinism.py --out results/h200/attention_determinism.csv
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import profile_parser  # noqa: E402

from bench.fast_decoder import FastDecoder, _additive  # noqa: E402
from bench.results import CsvWriter  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
COLUMNS = ["heads", "head_dim", "keys", "buffer", "call", "backend", "reruns", "calls_differing",
           "elements_differing", "us_per_call_graph", "error"]


def graph_us(fn, calls: int = 32, reps: int = 30) -> float:
    """Median time of one call, `calls` of them captured back to back in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(times)


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--keys", default="700,1000")
    ap.add_argument("--buffer", type=int, default=1024)
    ap.add_argument("--reruns", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, h, d, n = torch.device("cuda"), args.heads, args.head_dim, args.buffer
    keys = torch.randn(1, h, n, d, device=dev, dtype=torch.float16)
    values = torch.randn(1, h, n, d, device=dev, dtype=torch.float16)
    q = torch.randn(1, 1, h, d, device=dev, dtype=torch.float16).transpose(1, 2)  # transformers' view
    scale = d ** -0.5
    cfg = SimpleNamespace(model_type="llama", num_attention_heads=h, num_key_value_heads=h, hidden_size=h * d)
    dec = FastDecoder(SimpleNamespace(embed_tokens=None, norm=None, rotary_emb=None, layers=[]), None, cfg)
    matmul = torch.compile(dec._matmul_attention, dynamic=False)
    writer = CsvWriter(Path(args.out), COLUMNS)
    for length in [int(x) for x in args.keys.split(",")]:
        mask = _additive((torch.arange(n, device=dev) < length)[None, None, None], torch.float16)
        k_so_far, v_so_far = keys[:, :, :length].contiguous(), values[:, :, :length].contiguous()
        calls = {("dense", name): (lambda b=b: _sdpa(b, q, k_so_far, v_so_far, None, scale))
                 for name, b in BACKENDS.items()}
        calls |= {("masked", name): (lambda b=b: _sdpa(b, q, keys, values, mask, scale))
                  for name, b in BACKENDS.items()}
        calls[("masked", "matmul, compiled")] = lambda: matmul(q, keys, values, mask)
        for (call, backend), fn in calls.items():
            row = {"heads": h, "head_dim": d, "keys": length, "buffer": n if call == "masked" else length,
                   "call": call, "backend": backend, "reruns": args.reruns}
            try:
                first = fn().clone()
                outs = [fn() for _ in range(args.reruns)]
                row["calls_differing"] = sum(not torch.equal(o, first) for o in outs)
                row["elements_differing"] = sum(int((o != first).sum()) for o in outs)
                row["us_per_call_graph"] = graph_us(fn)
            except RuntimeError as e:  # a backend that cannot run this call (e.g. flash with a mask)
                row["error"] = str(e).splitlines()[0][:160]
            writer.write(row)
            print(row, flush=True)
    writer.close()


def _sdpa(backend, q, k, v, mask, scale):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


if __name__ == "__main__":
    main()

"""Does one attention call give the same output when repeated? Per SDPA backend, for the decode
call transformers makes (one query over exactly the keys so far, no mask) and the one the static
engines make (one query over a fixed KV buffer, additive mask), plus the compiled matmul attention
of the graph engine's steps; then prompts (causal), suffixes after a cached prefix (masked) and
vision towers (non-causal): of `--reruns` repeats of the identical call, how many differ from
the first and in how many elements; and the call's time inside a CUDA graph (median, us).

    python lab/gpu_attention_determinism.py --out attention_determinism.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import compiled_matmul_attention, graphed_us, profile_parser  # noqa: E402

from bench.engines.decoder import _additive  # noqa: E402
from bench.measure.results import CsvWriter  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
COLUMNS = ["heads", "head_dim", "queries", "keys", "buffer", "call", "backend", "reruns", "calls_differing",
           "elements_differing", "us_per_call_graph", "error"]


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--keys", default="700,1000")
    ap.add_argument("--buffer", type=int, default=1024)
    ap.add_argument("--reruns", type=int, default=50)
    ap.add_argument("--prefill-lengths", default="2,4,8,12,16,32,64,627",
                    help="causal prompts (queries = keys, no mask) and suffixes of this many queries after "
                         "--keys[0] cached keys (causal-offset mask), at --heads/--head-dim")
    ap.add_argument("--vision", default="16x64x577,16x72x729",
                    help="HEADSxDIMxTOKENS non-causal vision attention (CLIP-L/14-336, SigLIP-400M/14-384)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, h, d, n = torch.device("cuda"), args.heads, args.head_dim, args.buffer
    keys = torch.randn(1, h, n, d, device=dev, dtype=torch.float16)
    values = torch.randn(1, h, n, d, device=dev, dtype=torch.float16)
    q = torch.randn(1, 1, h, d, device=dev, dtype=torch.float16).transpose(1, 2)  # transformers' view
    scale = d ** -0.5
    matmul = compiled_matmul_attention(h, h, d)
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
            measure(writer, fn, args.reruns, {"heads": h, "head_dim": d, "queries": 1, "keys": length,
                                              "buffer": n if call == "masked" else length, "call": call,
                                              "backend": backend})
    prefix = int(args.keys.split(",")[0])
    for t in [int(x) for x in args.prefill_lengths.split(",")]:
        x = torch.randn(1, t, h, d, device=dev, dtype=torch.float16).transpose(1, 2)
        cols = prefix + torch.arange(t, device=dev)
        mask = _additive(torch.arange(prefix + t, device=dev)[None, :] <= cols[:, None], torch.float16)
        for name, b in BACKENDS.items():
            measure(writer, lambda b=b: _sdpa(b, x, x, x, None, scale, causal=True), args.reruns,
                    {"heads": h, "head_dim": d, "queries": t, "keys": t, "buffer": t, "call": "prompt, causal",
                     "backend": name})
            if prefix + t <= n:
                measure(writer, lambda b=b: _sdpa(b, x, keys[:, :, :prefix + t], values[:, :, :prefix + t], mask,
                                                  scale),
                        args.reruns, {"heads": h, "head_dim": d, "queries": t, "keys": prefix + t,
                                      "buffer": prefix + t, "call": "suffix, masked", "backend": name})
    for spec in args.vision.split(","):
        vh, vd, vt = (int(v) for v in spec.split("x"))
        x = torch.randn(1, vt, vh, vd, device=dev, dtype=torch.float16).transpose(1, 2)
        for name, b in BACKENDS.items():
            measure(writer, lambda b=b: _sdpa(b, x, x, x, None, vd ** -0.5), args.reruns,
                    {"heads": vh, "head_dim": vd, "queries": vt, "keys": vt, "buffer": vt, "call": "vision",
                     "backend": name})
    writer.close()


def measure(writer: CsvWriter, fn, reruns: int, row: dict) -> None:
    """Repeat `fn` and write how many repeats differ from the first call, and its graphed time."""
    row["reruns"] = reruns
    try:
        first = fn().clone()
        outs = [fn() for _ in range(reruns)]
        row["calls_differing"] = sum(not torch.equal(o, first) for o in outs)
        row["elements_differing"] = sum(int((o != first).sum()) for o in outs)
        row["us_per_call_graph"] = graphed_us(fn, warmup=1, reps=30)
    except RuntimeError as e:  # a backend that cannot run this call (e.g. flash with a mask)
        row["error"] = str(e).splitlines()[0][:160]
    writer.write(row)
    print(row, flush=True)


def _sdpa(backend, q, k, v, mask, scale, causal=False):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


if __name__ == "__main__":
    main()

"""Where full-prompt prefill and the suffix step spend their time on the graph engine's decoder:
wall time (CUDA events) and summed kernel time for each way of running the layers (eager or
torch.compile'd with a dynamic length; projections fused or separate), plus the top kernels.

    python lab/gpu_prefill_profile.py --preset llava-1.5-7b --out $OUT/prefill_profile.csv
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from gpu_profile_common import QUESTION, event_times_ms, graph_engine_after_one_request, kernel_times, profile_parser

from bench.engines.fused_linear import FUSED_MAX_ROWS
from bench.measure.results import CsvWriter


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    a, eng, image, r = graph_engine_after_one_request(args.preset, 8)
    p = a.prepare(image, QUESTION)
    dec, kv = eng.decoder, eng.cache
    w = CsvWriter(Path(args.out), ["model", "what", "config", "tokens", "wall_ms", "kernel_ms", "top_kernels"])
    with torch.inference_mode():
        embeds = a.prompt_embeds(p, a.encode_image(a.pixels_to_device(p)))
        compiled = torch.compile(dec.layer_from, dynamic=True)
        for fused in (False, True):
            dec.set_fused_max_rows(2**62 if fused else FUSED_MAX_ROWS)
            for name, fn in (("eager", None), ("compiled", compiled)):
                call = lambda fn=fn: dec.prefill(embeds, kv, 0, fn)[:, -1].argmax(-1)  # noqa: E731
                for _ in range(3):
                    call()
                wall = statistics.median(event_times_ms(call, args.reps))
                per = {k: ms for k, (ms, _) in kernel_times(call, 5).items()}
                top = "; ".join(f"{ms:.2f} {k[:50]}" for k, ms in sorted(per.items(), key=lambda kv: -kv[1])[:5])
                cfg = f"{name}, {'fused' if fused else 'separate'} projections"
                w.write({"model": args.preset, "what": "prefill", "config": cfg, "tokens": embeds.shape[1],
                         "wall_ms": wall, "kernel_ms": sum(per.values()), "top_kernels": top})
                print(f"prefill {embeds.shape[1]} tokens, {cfg}: wall {wall:.2f} ms, kernels "
                      f"{sum(per.values()):.2f} ms | {top}", flush=True)
        dec.set_fused_max_rows(FUSED_MAX_ROWS)
        prefix = embeds[:, :p.prefix_tokens]
        for t in (1, 16):
            x = embeds[:, p.prefix_tokens:p.prefix_tokens + 1].expand(1, t, -1).contiguous()
            n = torch.tensor(t, device="cuda")

            def call(x=x, n=n):
                kv.length.fill_(p.prefix_tokens)
                return dec.step(x, n, kv, eng.layer_fn)
            dec.prefill(prefix, kv, 0)
            for _ in range(3):
                call()
            per = {k: ms for k, (ms, _) in kernel_times(call, 10).items()}
            wall = statistics.median(event_times_ms(call, args.reps))  # eager launches: an upper bound on the graph
            top = "; ".join(f"{ms:.3f} {k[:50]}" for k, ms in sorted(per.items(), key=lambda kv: -kv[1])[:6])
            w.write({"model": args.preset, "what": "step (compiled layers, eager launch)", "config": "fused",
                     "tokens": t, "wall_ms": wall, "kernel_ms": sum(per.values()), "top_kernels": top})
            print(f"step {t} tokens: kernels {sum(per.values()):.3f} ms | {top}", flush=True)
    w.close()
    print("graph engine run:", {k: round(v, 2) for k, v in r.phases_ms.items()}, r.extra["engine_detail"])


if __name__ == "__main__":
    main()

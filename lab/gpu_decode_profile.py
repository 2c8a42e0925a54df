"""Where a graph-engine decode step spends its time: torch.profiler over eager KV-buffer
steps (the same kernels the CUDA graph replays), kernel time by name, against the replayed
step time and the weight-bytes bandwidth floor. Writes a CSV of kernel shares.

    python lab/gpu_decode_profile.py --preset llava-1.5-7b --out $OUT/decode_profile.csv
    python lab/gpu_decode_profile.py --preset llava-1.5-7b --weights rtn4 --int4-kernels measured \
        --out $OUT/decode_profile_rtn4.csv
    cp results/reference/h100/llava-1.5-7b-int4-graph-batch/kernels.json /tmp/kernels.json
    python lab/gpu_decode_profile.py --preset llava-1.5-7b --batch-size 16 --out $OUT/decode_profile_b16.csv
    python lab/gpu_decode_profile.py --preset llava-1.5-7b --weights rtn4 --int4-kernels measured \
        --int4-kernel-candidates tinygemm,dense,gemlite-gemv-revsplitk,fbgemm-shuffled,triton-tiles,gemlite-gemm-splitk,gemlite-gemm \
        --int4-kernel-cache /tmp/kernels.json --batch-size 16 --out $OUT/decode_profile_rtn4_b16.csv

With int4 weights the kernels per row count are --int4-kernels' (as `run`'s flag; `measured`
chooses per shape on this GPU first, --int4-kernel-candidates limiting the candidates;
--int4-kernel-cache reuses a kernels.json measured on this kind of GPU with those candidates, e.g. a
reference run's, and adds what it measures to it).
--pdl auto, the default, launches with programmatic dependent launch where the GPU has it (as run's
flag; off without); --inductor NAME=VALUE sets an inductor option first (combo_kernels=1);
--split-kv CONFIG launches the split-KV attention so (fused_combine=1: its splits combined in its
partial kernel).
--numerics the compiled layers' rounding (EngineSpec.numerics); --knockout leaves work out of the
step as lab/gpu_step_ab.py --ab knockout does (its tokens then mean nothing); --fold-norms profiles the
step layer with each RMSNorm in the GEMV before it (lab/gpu_step_ab.py --ab fold-norms).
--batch-size B profiles a step of B rows (after a batch of B requests), the kernels a batched
decode step replays.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gpu_profile_common import graph_engine_after_one_request, kernel_times, profile_parser

from bench.engines import split_kv_attention as sk
from bench.engines.spec import NUMERICS, EngineSpec
from gpu_step_ab import _knockout
from bench.pdl import MODES as PDL_MODES
from bench.measure.results import CsvWriter


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--weights", default="fp16", help="fp16 or rtn4")
    ap.add_argument("--int4-kernels", default="tinygemm")
    ap.add_argument("--int4-kernel-candidates", default=None)
    ap.add_argument("--int4-kernel-cache", default="", help="a kernels.json to reuse (default: measure)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--pdl", default=EngineSpec.pdl, choices=PDL_MODES,
                    help="programmatic dependent launch (as run's --pdl)")
    ap.add_argument("--split-kv", default="", help="the split-KV attention's launch configuration "
                    "(split_kv_attention.Config.parse: 'fused_combine=1'; default its DEFAULT)")
    ap.add_argument("--numerics", choices=NUMERICS, default="fused",
                    help="how the compiled layers round (default fused, as up to 2026-12-07; the graph engine's "
                         "own default is eager-casts)")
    ap.add_argument("--knockout", default="none", help="work left out of the step, as lab/gpu_step_ab.py "
                    "--ab knockout's values (e.g. silu): which kernels take its time, or more")
    ap.add_argument("--fold-norms", action="store_true", help="EngineSpec.fold_norms: each RMSNorm with the "
                    "residual add before it, in triton-f16x2's launch of o_proj and down_proj, and SiLU(gate) * up "
                    "in its launch of gate/up (since c3a77d1)")
    args = ap.parse_args()
    if args.fold_norms and "add-norm" in args.knockout.split("+"):
        raise SystemExit("--knockout add-norm leaves out the adds and norms of layer_at_deferred's step, which "
                         "--fold-norms does not run")
    if args.split_kv:
        sk.DEFAULT = sk.Config.parse(args.split_kv)
    _knockout(args.knockout, args.int4_kernels)
    spec = EngineSpec(pdl=args.pdl, numerics=args.numerics, int4_kernels=args.int4_kernels, fold_norms=args.fold_norms,
                      int4_kernel_cache=args.int4_kernel_cache,
                      int4_kernel_candidates=tuple(args.int4_kernel_candidates.split(","))
                      if args.int4_kernel_candidates else ())
    a, eng, _, r = graph_engine_after_one_request(args.preset, 128, args.weights, spec, args.batch_size)
    step_ms = sorted(r.step_ms)[len(r.step_ms) // 2]
    weight_bytes = sum(t.numel() * t.element_size() for t in (*a.language_model().parameters(),
                                                                 *a.language_model().buffers()))
    if a.family == "llava":
        weight_bytes += a.model.lm_head.weight.numel() * 2
    # Eager steps over the same KV buffers with the same (compiled) layers: the kernels the graph replays.
    tok = torch.full((args.batch_size,), r.tokens[-1], device="cuda")

    keys = eng.key_len(r.prompt_tokens, 1)  # the columns the graph's step attends over there

    def step():  # one decode step at the prompt's end (rewound each time: the buffer is finite)
        eng.cache.length.fill_(r.prompt_tokens)
        eng.step_call(eng.decoder.embed(tok[:, None]), eng.one, keys)

    with torch.inference_mode():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        per_kernel = kernel_times(step, args.steps)
    total = sum(ms for ms, _ in per_kernel.values())
    w = CsvWriter(Path(args.out), ["model", "weights", "batch_size", "int4_kernels", "inductor", "pdl", "split_kv",
                                   "numerics", "knockout", "step_ms", "kernel", "ms_per_step", "launches_per_step",
                                   "share"])
    plan = eng.int4_kernels.column() if eng.int4_kernels is not None else ""
    for name, (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]):
        w.write({"model": args.preset, "weights": args.weights, "batch_size": args.batch_size, "int4_kernels": plan,
                 "inductor": ";".join(args.inductor), "pdl": eng.pdl,
                 "split_kv": sk.DEFAULT.label() if eng.decoder.split_kv else "", "numerics": args.numerics,
                 "knockout": args.knockout, "step_ms": step_ms,
                 "kernel": name[:120], "ms_per_step": ms, "launches_per_step": n, "share": ms / total})
    w.close()
    launches = sum(n for _, n in per_kernel.values())
    settings = " ".join([*args.inductor, *(["PDL"] if eng.pdl else [])])
    print(f"{args.preset} {args.weights} b{args.batch_size} {plan} {settings}: graph step {step_ms:.2f} ms; "
          f"kernel time {total:.2f} ms in {launches:.0f} kernels/step; "
          f"LLM weights {weight_bytes / 1e9:.2f} GB -> {weight_bytes / step_ms / 1e6:.0f} GB/s achieved")
    for name, (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"  {ms:6.3f} ms  {n:5.0f}x  {name[:90]}")


if __name__ == "__main__":
    main()

"""Does a torch.compile'd decoder layer write what the eager one does? Per numerics mode
(bench.engines.decoder.NUMERICS), one decode step of a preset (random weights, after a real
prompt's prefill), every layer fed the eager step's input for it: the share of output elements
that differ from eager's and the largest difference, and the same for the step's logits.
It compiles FastDecoder.layer_at; the graph engine compiles layer_at_deferred, whose outputs are
layer_at's bit for bit under the eager numerics (tests/test_fast_decoder.py checks it on the CPU).

    python lab/gpu_compile_numerics.py --preset llava-1.5-7b --out compile_numerics_llava-1.5-7b.csv
        [--attention-kernels auto]  (bench.engines.attention_kernels; default deterministic)
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import QUESTION, demo_image, profile_parser  # noqa: E402

from bench.engines import attention_kernels  # noqa: E402
from bench.engines.attention_kernels import ATTENTION_KERNELS  # noqa: E402
from bench.engines.cache_policy import CachePolicy  # noqa: E402
from bench.engines.decoder import inductor_options  # noqa: E402
from bench.engines.spec import NUMERICS  # noqa: E402
from bench.models.loader import build_preset  # noqa: E402
from bench.measure.results import CsvWriter  # noqa: E402
from bench.engines.static import StaticEngine  # noqa: E402


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--attention-kernels", default="deterministic", choices=ATTENTION_KERNELS)
    args = ap.parse_args()
    image = demo_image()
    dev = torch.device(args.device)
    a = build_preset(args.preset, None, dev, getattr(torch, args.dtype))
    engine = StaticEngine(a, CachePolicy(), dataclasses.replace(StaticEngine.default_spec,
                                                                attention=args.attention_kernels))
    dec = engine.decoder
    # one-query calls, eager and compiled alike, under the chosen kernels (cuDNN's would repeat inexactly)
    with torch.inference_mode(), attention_kernels.few_queries(args.attention_kernels, 1):
        first = engine.run(image, QUESTION, 2).tokens[-1]  # leaves the prompt + 1 token in the buffers
        cache = engine.cache
        kv_saved = cache.data.clone()
        length = cache.length.clone()
        inputs, outputs = [], []

        def recording(*layer_args):
            out = dec.layer_at(*layer_args)
            inputs.append(tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in layer_args))
            outputs.append(out.clone())
            return out

        emb = dec.embed(torch.tensor([[first]], device=dev))
        want_logits = dec.step(emb, engine.one, cache, recording).clone()
        # the eager layer run again: what differs without compiling (nondeterministic attention)
        rerun = [dec.layer_at(b, h, c, s, p, m, k.clone(), v.clone(), e)
                 for (b, h, c, s, p, m, k, v, e) in inputs]
        rerun_share = sum(int((g != w).sum()) for g, w in zip(rerun, outputs)) / sum(w.numel() for w in outputs)
        writer = CsvWriter(Path(args.out), ["model", "weights", "attention_kernels", "numerics", "inductor_options",
                                            "eager_rerun_differ_share", "layer_out_differ_share",
                                            "layer_out_max_abs_diff", "logits_differ_share", "logits_max_abs_diff"])
        for numerics in NUMERICS:
            torch._dynamo.reset()
            dec.numerics = numerics
            fn = torch.compile(dec.layer_at, dynamic=False, options=inductor_options(numerics))
            differ = total = 0
            worst = 0.0
            for args_i, want in zip(inputs, outputs):
                block, h, cos, sin, pos, mask, keys, values, keys_end = args_i
                got = fn(block, h, cos, sin, pos, mask, keys.clone(), values.clone(), keys_end)
                differ += int((got != want).sum())
                total += want.numel()
                worst = max(worst, float((got.float() - want.float()).abs().max()))
            cache.data.copy_(kv_saved)
            cache.length.copy_(length)
            logits = dec.step(emb, engine.one, cache, fn)
            cache.data.copy_(kv_saved)
            cache.length.copy_(length)
            row = {"model": args.preset, "weights": "random", "attention_kernels": args.attention_kernels,
                   "numerics": numerics, "inductor_options": inductor_options(numerics),
                   "eager_rerun_differ_share": rerun_share,
                   "layer_out_differ_share": differ / total, "layer_out_max_abs_diff": worst,
                   "logits_differ_share": float((logits != want_logits).float().mean()),
                   "logits_max_abs_diff": float((logits.float() - want_logits.float()).abs().max())}
            writer.write(row)
            print(row, flush=True)
        dec.numerics = "fused"
    writer.close()


if __name__ == "__main__":
    main()

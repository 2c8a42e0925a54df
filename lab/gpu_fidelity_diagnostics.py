"""Diagnostics behind the fidelity columns on a GPU: is the fp16 baseline deterministic run to
run, and how large is bitsandbytes' error per layer and for the whole model (random weights)?

    python lab/gpu_fidelity_diagnostics.py --preset vila1.5-3b
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engines.cache_policy import CachePolicy  # noqa: E402
from bench.quiet import quiet_libraries  # noqa: E402
from bench.run.config import DEMO_IMAGE  # noqa: E402
from bench.engines.hf import HFEngine  # noqa: E402
from bench.run.fidelity import kl_mean, teacher_forced_logprobs  # noqa: E402
from bench.models.loader import build_preset  # noqa: E402
from bench.models.prompts import FIDELITY_PROBE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vila1.5-3b")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    quiet_libraries()
    from PIL import Image
    from transformers import BitsAndBytesConfig

    from variants.bnb import swap_linears

    image = Image.open(DEMO_IMAGE).convert("RGB")
    dev = torch.device("cuda")
    a = build_preset(args.preset, None, dev, torch.float16)
    eng = HFEngine(a, CachePolicy())
    runs = [eng.run(image, FIDELITY_PROBE, args.new_tokens).tokens for _ in range(3)]
    lp = [teacher_forced_logprobs(a, image, FIDELITY_PROBE, runs[0]) for _ in range(2)]
    agree = [sum(x == y for x, y in zip(runs[0], r)) / len(r) for r in runs[1:]]
    print(f"fp16 greedy run-to-run agreement: {agree}; teacher-forced logprob max diff "
          f"{(lp[0] - lp[1]).abs().max().item():.3g}; KL {kl_mean(lp[0], lp[1]):.3g}")
    top2 = lp[0].topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1])
    print(f"fp16 logprob top1-top2 gap: median {gaps.median().item():.3g}, min {gaps.min().item():.3g}; "
          f"logit std {lp[0].std(dim=-1).mean().item():.3g}")
    dense = teacher_forced_logprobs(a, image, FIDELITY_PROBE, runs[0])
    x = torch.randn(16, a.model.llm.config.hidden_size if hasattr(a.model, "llm") else 4096, device=dev,
                    dtype=torch.float16)
    for name, qc in [("bnb8", BitsAndBytesConfig(load_in_8bit=True)),
                     ("bnb4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float16))]:
        lin = torch.nn.Linear(x.shape[1], 4 * x.shape[1], bias=False, device=dev, dtype=torch.float16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        ref = lin(x)
        holder = torch.nn.Sequential(lin)
        swap_linears(holder, qc, dev)
        err = ((holder[0](x) - ref).norm() / ref.norm()).item()
        b = build_preset(args.preset, None, dev, torch.float16)
        for m in b.quantization_targets(False):
            swap_linears(m, qc, dev)
        q = teacher_forced_logprobs(b, image, FIDELITY_PROBE, runs[0])
        print(f"{name}: single linear rel err {err:.4f}; whole model KL vs fp16 {kl_mean(dense, q):.4f}; "
              f"top1 agreement (teacher-forced) {(q.argmax(-1) == dense.argmax(-1)).float().mean().item():.3f}")
        del b
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

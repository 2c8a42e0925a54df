"""Do an engine's warm requests (after a prefix-cache hit) give the hf engine's warm tokens?

lab/gpu_agreement_floor.py compares cold requests. Here, per engine, one cold request stores
the prefix (system prompt + image), then each question runs warm: its suffix prefilled after the
restored prefix, then `--new-tokens` greedy tokens. Rows: per engine and question, the suffix
length, token_agree with the hf engine's warm request and the first divergence (random weights:
near-ties are frequent, so only arithmetic identical to transformers' keeps all of them).

    python lab/gpu_warm_agreement.py --preset llava-1.5-7b --engines graph-exact,graph \
        --out warm_agreement_llava-1.5-7b.csv
"""
from __future__ import annotations

from pathlib import Path

import torch

from gpu_profile_common import demo_image, profile_parser

from bench.run.fidelity import first_divergence, token_agree
from bench.models.loader import build_preset
from bench.measure.results import CsvWriter
from variants import registry
from variants.prefix import PrefixKVPolicy

QUESTIONS = ["What is shown in this image?", "Colors?",
             "List every object you can see in this picture, from left to right, with its color and size."]


def warm_tokens(engine, image, new_tokens: int) -> list[tuple[int, list[int]]]:
    """(suffix tokens, generated tokens) of each question run warm after one cold request."""
    engine.run(image, "Warm-up: describe the image.", 4)  # stores the prefix
    out = []
    for q in QUESTIONS:
        r = engine.run(image, q, new_tokens)
        assert r.cache_hit, q
        out.append((r.prompt_tokens - r.cached_tokens, r.tokens))
    return out


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--engines", default="graph-exact,graph")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    image = demo_image()
    adapter = build_preset(args.preset, None, torch.device("cuda"), torch.float16)
    parts = registry()
    ref = warm_tokens(parts["hf"].make_engine(adapter, PrefixKVPolicy(4096)), image, args.new_tokens)
    w = CsvWriter(Path(args.out), ["model", "weights", "engine", "question", "suffix_tokens", "new_tokens",
                                   "token_agree", "first_divergence", "engine_detail"])
    for name in ["hf again", *args.engines.split(",")]:
        engine = parts[name.removesuffix(" again")].make_engine(adapter, PrefixKVPolicy(4096))
        for q, (suffix, want), (_, got) in zip(QUESTIONS, ref, warm_tokens(engine, image, args.new_tokens)):
            row = {"model": args.preset, "weights": "random", "engine": name, "question": q, "suffix_tokens": suffix,
                   "new_tokens": len(want), "token_agree": token_agree(got, want),
                   "first_divergence": first_divergence(got, want), "engine_detail": engine.describe()}
            w.write(row)
            print({k: row[k] for k in ("engine", "suffix_tokens", "token_agree", "first_divergence")}, flush=True)
        del engine
        torch.cuda.empty_cache()
    w.close()


if __name__ == "__main__":
    main()

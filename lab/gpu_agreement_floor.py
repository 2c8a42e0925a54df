"""How far greedy tokens of transformers' own fp16 forward agree with themselves when nothing but
the kernels changes, next to the static and graph engines (random weights).

The `hf` engine is the reference (warmed, as the benchmark's fidelity probe does). Each other
way of running the same weights on the same probe gives: token_agree, first_divergence, the
reference's margin there in rounding steps of the logits' dtype (0-1: a rounding flip of a
near-tie), and the reference's near-tie share. Ways:
- hf again: the same kernels (run-to-run determinism); "WAY again" likewise for another way (two
  fresh engines of it against each other);
- hf, eager attention: transformers' other attention implementation (`attn_implementation="eager"`);
- hf, StaticCache: transformers' forward over its StaticCache (what torch.compile-ing
  transformers' decode step would run), eager;
- static / graph: this harness's engines (graph with its default numerics);
- "graph, NUMERICS numerics" (bench.engines.decoder.NUMERICS): the graph engine whose compiled layers
  fuse freely ("fused"), round as eager does ("eager-casts") or also reduce as eager does
  ("eager-exact");
- "graph, separate prefill projections" (q/k/v and gate/up unfused at prompt length, as `static`
  and transformers) and "graph, uncompiled" (captured, not compiled; eager prefill);
- graph-exact: the engine doing transformers' arithmetic (should agree 128/128, as hf again);
  "graph-exact, uncompiled" captures its layer parts uncompiled (tells a compiled part that
  does not round as eager from anything else); "graph-exact, projections in turn" runs a step's
  separate GEMMs one after another rather than side by side (what the streams buy).
Each row also gives the way's median decode step as the benchmark's timeline measures it
(`decode_step_ms`, a 128-token request after a warm one) and its `engine_detail`.

    python lab/gpu_agreement_floor.py --preset llava-1.5-7b --out agreement_floor_llava-1.5-7b.csv
        [--attention-kernels auto]  (bench.engines.attention_kernels; default deterministic)
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_profile_common import demo_image, profile_parser  # noqa: E402

from bench.engines.attention_kernels import ATTENTION_KERNELS  # noqa: E402
from bench.engines.cache_policy import CachePolicy  # noqa: E402
from bench.engines.hf import HFCache, HFEngine  # noqa: E402
from bench.run.fidelity import agreement, first_divergence, make_reference, token_agree  # noqa: E402
from bench.engines.exact import ExactLayers  # noqa: E402
from bench.engines.fused_linear import FUSED_MAX_ROWS  # noqa: E402
from bench.models.loader import build_preset  # noqa: E402
from bench.measure.results import CsvWriter  # noqa: E402
from bench.engines.graph import GraphEngine  # noqa: E402
from bench.engines.graph_exact import GraphExactEngine  # noqa: E402
from bench.engines.static import StaticEngine  # noqa: E402

COLUMNS = ["model", "weights", "dtype", "device", "attention_kernels", "compared", "new_tokens", "token_agree",
           "first_divergence",
           "divergence_margin", "divergence_margin_steps", "ref_near_tie_share", "decode_step_ms", "engine_detail"]


class HFStaticCacheEngine(HFEngine):
    """The hf engine over transformers' StaticCache instead of a DynamicCache."""

    def new_cache(self, prompt_tokens: int, max_new_tokens: int, batch: int = 1):
        from transformers import StaticCache

        cache = HFCache()
        cache.kv = StaticCache(config=self.adapter.text_config(), max_cache_len=prompt_tokens + max_new_tokens)
        return cache

    def describe(self) -> str:
        return "transformers forward, StaticCache"


def graph_engine(numerics: str | None = None, separate_prefill: bool = False, compiled: bool = True,
                 separate_decode: bool = False):
    """A GraphEngine class with the given numerics (default: the engine's) / prompt-length
    projections (or at every length: the GEMVs transformers runs) / compilation."""

    class Engine(GraphEngine):
        default_spec = dataclasses.replace(
            GraphEngine.default_spec, numerics=numerics or GraphEngine.default_spec.numerics,
            fused_max_rows=(0 if separate_decode else FUSED_MAX_ROWS if separate_prefill
                            else GraphEngine.default_spec.fused_max_rows))

        def __init__(self, adapter, policy, spec=None):
            super().__init__(adapter, policy, spec)
            if not compiled:
                self.layer_fn = self.prefill_fn = None

    return Engine


class GraphExactUncompiled(GraphExactEngine):
    """graph-exact with its layer parts captured uncompiled (eager); its projections still side by side."""

    def __init__(self, adapter, policy, spec=None):
        super().__init__(adapter, policy, spec)
        layers = ExactLayers(self.decoder, None, self._projection_streams())
        self.layer_fn, self.prefill_fn = layers.at, layers.from_


class GraphExactInTurn(GraphExactEngine):
    """graph-exact with a step's separate projections one after another on one stream."""
    default_spec = dataclasses.replace(GraphExactEngine.default_spec, concurrent_projections=False)


def attention_module_owner(adapter):
    """The transformers model whose attention implementation the LLM uses."""
    return adapter.model if hasattr(adapter.model, "set_attn_implementation") else adapter.model.llm


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--ways", default="hf again;hf eager attention;hf StaticCache;static;graph;graph, fused "
                    "numerics;graph, eager-exact numerics;graph, uncompiled;graph-exact;graph-exact again",
                    help="';'-separated; 'WAY again' (other than hf) compares two fresh engines of WAY")
    ap.add_argument("--attention-kernels", default="deterministic", choices=ATTENTION_KERNELS)
    args = ap.parse_args()
    image = demo_image()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    adapter = build_preset(args.preset, None, dev, dtype)
    engines = {
        "hf again": HFEngine,
        "hf eager attention": HFEngine,
        "hf StaticCache": HFStaticCacheEngine,
        "static": StaticEngine,
        "graph": graph_engine(),
        "graph, fused numerics": graph_engine("fused"),
        "graph, eager-casts numerics": graph_engine("eager-casts"),
        "graph, eager-exact numerics": graph_engine("eager-exact"),
        "graph, separate prefill projections": graph_engine(separate_prefill=True),
        "graph, uncompiled": graph_engine(compiled=False),
        "graph, eager-exact numerics, separate projections": graph_engine("eager-exact", separate_decode=True),
        "graph-exact": GraphExactEngine,
        "graph-exact, uncompiled": GraphExactUncompiled,
        "graph-exact, projections in turn": GraphExactInTurn,
    }
    # every engine under the chosen attention kernels (the reference's too)
    make = lambda cls: cls(adapter, CachePolicy(), dataclasses.replace(  # noqa: E731
        cls.default_spec, attention=args.attention_kernels))
    ref = make_reference(make(HFEngine), image, args.new_tokens)
    writer = CsvWriter(Path(args.out), COLUMNS)
    for way in [w.strip() for w in args.ways.split(";")]:
        repeated = way.removesuffix(" again") if way.endswith(" again") and way != "hf again" else None
        engine = make(engines[repeated or way])
        if repeated:
            first = warm_then_run(engine, image, ref.question, args.new_tokens).tokens
            engine = make(engines[repeated])
            result = warm_then_run(engine, image, ref.question, args.new_tokens)
            agree = self_agreement(first, result.tokens)
        elif way == "hf eager attention":
            owner = attention_module_owner(adapter)
            before = adapter.decoder_parts()[0].config._attn_implementation
            owner.set_attn_implementation("eager")
            try:
                result = warm_then_run(engine, image, ref.question, args.new_tokens)
            finally:
                owner.set_attn_implementation(before)
        else:
            result = warm_then_run(engine, image, ref.question, args.new_tokens)
        if not repeated:
            agree = agreement(ref, result.tokens)
        row = {"model": args.preset, "weights": "random", "dtype": args.dtype, "device": dev.type,
               "attention_kernels": args.attention_kernels, "compared": way, "new_tokens": args.new_tokens, **agree,
               "decode_step_ms": statistics.median(result.step_ms), "engine_detail": engine.describe()}
        writer.write(row)
        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        del engine
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    writer.close()


def self_agreement(first: list[int], second: list[int]) -> dict:
    """Two runs of one way against each other (the reference's margins do not apply)."""
    return {"token_agree": token_agree(second, first),
            "first_divergence": first_divergence(first, second)}


def warm_then_run(engine, image, question: str, new_tokens: int):
    """The second of two requests (the first compiles and captures), as the fidelity probe runs."""
    engine.run(image, question, new_tokens)
    return engine.run(image, question, new_tokens)


if __name__ == "__main__":
    main()

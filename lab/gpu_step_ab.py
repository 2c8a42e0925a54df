"""Does a setting shorten the graph engine's decode step? Each of its values in one process,
alternated round by round (a process's step varies by a few percent from the next one's, so two
processes decide nothing), for fp16 and int4 (rtn4) weights of one preset: each round makes a new
graph engine per weights and value (compiled and captured afresh), runs one request and records
its decode steps' median. Writes one CSV row per round, weights and value, with a digest of the
request's greedy tokens (`tokens_sha`: the same digest for two values means the same answer; a
setting that only changes how kernels are launched, as PDL and its prefetch do, must not change it)
and of the configurations triton-f16x2 was tuned to in the process so far (`f16x2_configs`; the
f16x2-tuning setting tunes afresh each round, so there it is the round's own).

    python lab/gpu_step_ab.py --ab pdl --preset llava-1.5-7b --rounds 3 --out $OUT/pdl_ab_llava-1.5-7b.csv
    python lab/gpu_step_ab.py --ab fused-combine --preset llava-1.5-7b --out $OUT/fused_combine_ab_llava-1.5-7b.csv

--ab pdl: the engines' `--pdl` off against auto (programmatic dependent launch); fused-combine: the
split-KV decode attention's splits combined by a second kernel (0) or by the partial kernel's last
program (1; bench.engines.split_kv_attention.Config.fused_combine, set on the module's DEFAULT,
which each capture reads); deferred-residual: the step layer compiled from FastDecoder.layer_at
(0) or layer_at_deferred (1, the engine's own: each MLP residual add fused into the next layer,
keys and values written by one copy, or since 1ff4e3f by split-KV attention's kernel, write_kv,
which layer_at's step does not do, nor, with it, the one-row causal mask made from the new column,
causal_mask); pdl-prefetch: `--pdl off` (off) against `--pdl auto` with
triton-f16x2 asking L2 for the first 0 to 4 quarters of its weights before the wait
(bench.pdl.PREFETCH; 0 is the default; up to 9d5d362 split-KV attention prefetched its keys and
values with any quarters, since its own setting: split-kv's prefetch).
pdl-preload: under PDL, triton-f16x2's programs load the first block of their weights before the
wait (1, bench.pdl.PRELOAD) or not (0, the default). f16x2-stages: the K loops triton-f16x2's
tuning chooses from (bench.quant.triton_f16x2.K_LOOPS, joined by +: 1 not pipelined, 3 three
stages, either with `w`, x read by whole k-tiles; 1+1w+3+3w the default), tuned afresh for each value.
pdl-late: under PDL, triton-f16x2 and split-KV attention let the next kernel start after their main
loop (1, bench.pdl.LATE, the default) or right after their wait (0).
f16x2-splits: the K splits triton-f16x2's tuning tries besides none (bench.quant.triton_f16x2.SPLITS,
joined by +, or none; each split's shares summed by the program that finishes last), tuned afresh for
each value.
fold-norms: the step layer compiled from FastDecoder.layer_at_deferred (0) or layer_at_folded (1,
EngineSpec.fold_norms: each RMSNorm with the residual add before it in triton-f16x2's launch of o_proj
and down_proj, bench.quant.triton_f16x2._add_norm; "on" where the int4 layers run triton-f16x2;
since c3a77d1 also SiLU(gate) * up in its launch of gate/up, fold-gate, which the fold-norms CSVs
of 2026-12-07 predate).
norm-ahead: the folded step (fold-norms 1) with the last row block of the add-and-norm tail asking
for the first pass's h and norm weight after adding the row blocks' sums (0) or with them (1,
bench.quant.triton_f16x2.NORM_AHEAD, the default since 2026-12-08): the same bits.
fold-gate: the folded step (fold-norms 1) with the MLP's SiLU(gate) * up made by a kernel of its own
(0) or in the launch of triton-f16x2's fused gate/up projection (1, FastDecoder.fold_gate, the
default, bench.quant.triton_f16x2._gated: ATen's SiLU; the tokens may differ, as the gated launch
is tuned apart from the plain one and may sum in another order).
f16x2-tuning: triton-f16x2's configuration per shape chosen by Triton's autotuner (triton; as up to
b0f85fb, lab/gpu_f16x2_tuning_spread.py) or by the kernel's own tuning in CUDA graphs (graph, the
default since), tuned afresh in every round.
split-kv: the split-KV attention's launch configuration (bench.engines.split_kv_attention.Config,
set on the module's DEFAULT), its fields joined by / (e.g. combine_chunk=8/prefetch=1; the
fields not named are the defaults'): by default the splits' partials combined 8 at a time against
all 16 at once. The other settings are timed under the engines' default `--pdl auto` (off before 2026-12-07).
knockout: the step with some of its work left out, to bound what fusing it elsewhere could gain (the
tokens are then meaningless; the GEMVs' and attention's times do not depend on the values): none,
add-norm (the residual adds and RMSNorms of every layer: the GEMVs read each other's outputs
directly), silu (the down projection reads the up half of the gate/up output), kv-write (the new
key's rotation and the key and value writes, by a kernel of their own or, split-kv's write_kv, by
the attention kernel), attention (its output is the query; the keys and values still written by
a kernel of their own, except under write_kv: then left out too), several joined by +. Split-KV
attention's steps only (one row, CUDA).
`--values` times other values, or more than two, in the same rounds.
--int4-kernels as run's flag (default triton-f16x2: what `measured` chooses at one row on every
decoder shape of llava-1.5-7b and vila1.5-3b on an H100); --seconds stops starting rounds after
that long (the rounds finished are written as they finish).
(The PDL CSVs under results/lab/h100 were written at ef34b17 by this script's earlier form,
lab/gpu_pdl_ab.py, with columns pdl and pdl_on for setting/value and on.)
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

from gpu_profile_common import QUESTION, demo_image, preset_adapter, profile_parser

from bench import pdl
from bench.engines import split_kv_attention as sk
from bench.engines.cache_policy import CachePolicy
from bench.engines.decoder import inductor_options
from bench.engines.graph import GraphEngine
from bench.engines.spec import NUMERICS, EngineSpec
from bench.measure.results import CsvWriter


def _pdl(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    return EngineSpec(pdl=value, int4_kernels=int4_kernels), lambda engine: engine.pdl


def _fused_combine(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    sk.DEFAULT = dataclasses.replace(sk.DEFAULT, fused_combine=value == "1")
    return EngineSpec(int4_kernels=int4_kernels), lambda engine: sk.DEFAULT.fused_combine and engine.decoder.split_kv


_ORIGINAL = {}  # what a setting swaps out, as the module had it


def _f16x2_tuning(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    from bench.quant import triton_f16x2

    if value not in ("graph", "triton"):
        raise SystemExit(f"--ab f16x2-tuning value {value!r}: graph or triton")
    if not int4_kernels.startswith("triton-f16x2") or int4_kernels.endswith("splitk"):
        raise SystemExit(f"--ab f16x2-tuning compares tunings of triton-f16x2 without split, not {int4_kernels}")
    graph_tune = _ORIGINAL.setdefault("f16x2 tune", triton_f16x2._tune)  # the module's own (swapped below)
    triton_f16x2._TUNED.clear()  # tuned afresh in each round, by the value's tuning
    if value == "triton":
        from gpu_f16x2_tuning_spread import triton_autotuner, triton_tune

        autotuner = triton_autotuner()

        def tune(x32, packed, sz32, n, k, group_size, split, pdl_launch, gate=False):
            if split or gate:  # (the autotuner times the plain GEMV only)
                return graph_tune(x32, packed, sz32, n, k, group_size, split, pdl_launch, gate)
            best = triton_tune(autotuner, x32, packed, sz32, n, k, group_size, pdl_launch)[0][0]
            return triton_f16x2.launch_config(best)

        triton_f16x2._tune = tune
    else:
        triton_f16x2._tune = graph_tune
    return EngineSpec(int4_kernels=int4_kernels), lambda engine: bool(engine._int4_layers())


def _split_kv(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    try:
        sk.DEFAULT = sk.Config.parse(value.replace("/", ","))
    except ValueError as e:
        raise SystemExit(f"--ab split-kv value {value!r} (Config fields joined by /, e.g. combine_chunk=8/prefetch=1): "
                         f"{e}") from None
    return EngineSpec(int4_kernels=int4_kernels), lambda engine: engine.decoder.split_kv


def _deferred_residual(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    def took(engine) -> bool:
        if value == "0":  # the engine's step layer compiled from layer_at instead (nothing compiled yet)
            options = inductor_options(engine.spec.numerics)
            engine.layer_fn = torch.compile(engine.decoder.layer_at, dynamic=False, options=options)
        return getattr(engine.layer_fn, "defers_residual", False)

    return EngineSpec(int4_kernels=int4_kernels), took


def _no_add_norm(self, block, h, pending, cos, sin, pos, mask, pair, keys_end=None):
    """layer_at_deferred without its two residual adds (knockout add-norm; its norms are gone by _norm)."""
    o = self._attend_at(block, h, cos, sin, pos, mask, pair[0], pair[1], keys_end, pair)
    h = block.o(self._merged_heads(o))
    return h, self._mlp(block, h)


def _no_kv_write(self, block, h, cos, sin, pos, mask, keys, values, keys_end=None, pair=None, normed=None):
    """_attend_at without the new key's rotation and the keys' and values' write (knockout kv-write;
    calls of more than one query, or uncompiled, as they were). The kernel then reads the caller's
    mask: the causal one made from the new column (Config.causal_mask) comes with the write only."""
    if not self._attends_by_split_kv(h):
        return _ORIGINAL["FastDecoder._attend_at"](self, block, h, cos, sin, pos, mask, keys, values, keys_end, pair,
                                                   normed)
    q, _, _ = self._qkv(block, h, cos, sin, rotate_q=not sk.DEFAULT.rotary, normed=normed)
    keys, values = keys[:, :, :keys_end], values[:, :, :keys_end]
    return torch.ops.vlmbench.split_kv_attention(q, keys, values, mask, self.scaling,
                                                 *((cos, sin, self.numerics != "fused") if sk.DEFAULT.rotary else ()))


def _no_attention(self, block, h, cos, sin, pos, mask, keys, values, keys_end=None, pair=None, normed=None):
    """_attend_at with the query (unrotated, as split-KV attention takes it) in place of the attention's
    output (knockout attention; calls of more than one query, or uncompiled, as they were)."""
    if not self._attends_by_split_kv(h):
        return _ORIGINAL["FastDecoder._attend_at"](self, block, h, cos, sin, pos, mask, keys, values, keys_end, pair,
                                                   normed)
    q, k, v = self._qkv(block, h, cos, sin, rotate_q=False, rotate_k=pair is None or not sk.DEFAULT.write_kv,
                        normed=normed)
    if pair is None:  # (layer_at's step)
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
    elif not sk.DEFAULT.write_kv:  # (the write is the attention kernel's own under write_kv: left out with it)
        pair.index_copy_(3, pos, torch.stack((k, v)))
    return q


# knockout value -> {FastDecoder method: its stand-in}; several joined by +
_KNOCKOUTS = {"none": {}, "add-norm": {"_norm": lambda self, norm, x: x, "layer_at_deferred": _no_add_norm},
              "silu": {"_gate": lambda self, block, gate, up: up}, "kv-write": {"_attend_at": _no_kv_write},
              "attention": {"_attend_at": _no_attention}}


def _knockout(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    from bench.engines.decoder import FastDecoder

    names = value.split("+")
    if not set(names) <= set(_KNOCKOUTS) or "kv-write" in names and "attention" in names:
        raise SystemExit(f"knockout {value!r}: {', '.join(_KNOCKOUTS)} joined by + (not both kv-write "
                         "and attention)")
    for name in {m for stand_ins in _KNOCKOUTS.values() for m in stand_ins}:  # the decoder's own methods first
        setattr(FastDecoder, name, _ORIGINAL.setdefault(f"FastDecoder.{name}", getattr(FastDecoder, name)))
    for name in names:
        for method, stand_in in _KNOCKOUTS[name].items():
            setattr(FastDecoder, method, stand_in)
    # (kv-write and attention leave out work of split-KV steps only)
    return EngineSpec(int4_kernels=int4_kernels), lambda engine: value != "none"


def _pdl_prefetch(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    if value == "off":  # no PDL at all
        return EngineSpec(pdl="off", int4_kernels=int4_kernels), lambda engine: False
    if value not in ("0", "1", "2", "3", "4"):
        raise SystemExit(f"--ab pdl-prefetch value {value!r}: off, or 0 to 4 quarters")
    pdl.PREFETCH = int(value)
    return EngineSpec(pdl="auto", int4_kernels=int4_kernels), lambda engine: engine.pdl


def _pdl_preload(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    if value not in ("0", "1"):
        raise SystemExit(f"--ab pdl-preload value {value!r}: 0 or 1")
    pdl.PRELOAD = value == "1"
    # on only where triton-f16x2 runs under PDL (fp16 weights, or other int4 kernels: nothing preloads)
    f16x2 = int4_kernels.startswith("triton-f16x2")
    return EngineSpec(pdl="auto", int4_kernels=int4_kernels), \
        lambda engine: engine.pdl and pdl.PRELOAD and f16x2 and bool(engine._int4_layers())


def _pdl_late(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    if value not in ("0", "1"):
        raise SystemExit(f"--ab pdl-late value {value!r}: 0 or 1")
    pdl.LATE = value == "1"  # read at each launch (and keying triton-f16x2's tuning: tuned afresh for each value)
    return EngineSpec(pdl="auto", int4_kernels=int4_kernels), lambda engine: engine.pdl and pdl.LATE


def _f16x2_stages(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    from bench.quant import triton_f16x2

    loops = tuple(value.split("+"))
    triton_f16x2.K_LOOPS = loops  # they key its tuning (tuning_key): tuned afresh for each value
    try:
        triton_f16x2.k_loops()
    except ValueError as e:
        raise SystemExit(f"--ab f16x2-stages value {value!r} (K loops joined by +, e.g. 1+3): {e}") from None
    f16x2 = int4_kernels.startswith("triton-f16x2")
    return EngineSpec(int4_kernels=int4_kernels), \
        lambda engine: loops != ("1",) and f16x2 and bool(engine._int4_layers())


def _f16x2_splits(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    from bench.quant import triton_f16x2
    from gpu_f16x2_tuning_spread import splits_value

    triton_f16x2.SPLITS = splits_value(value)
    try:  # they key its tuning (tuning_key): tuned afresh for each value
        triton_f16x2.splits()
    except ValueError as e:
        raise SystemExit(f"--ab f16x2-splits value {value!r} (none, or splits joined by +, e.g. 2+4): {e}") from None
    f16x2 = int4_kernels == "triton-f16x2"
    return EngineSpec(int4_kernels=int4_kernels), \
        lambda engine: bool(triton_f16x2.SPLITS) and f16x2 and bool(engine._int4_layers())


def _fold_norms(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    if value not in ("0", "1"):
        raise SystemExit(f"--ab fold-norms value {value!r}: 0 or 1")
    # on where the step layer folds and an int4 layer's kernel at one row does it in its launch
    return EngineSpec(int4_kernels=int4_kernels, fold_norms=value == "1"), \
        lambda engine: getattr(engine.layer_fn, "folds_norms", False) and any(
            m.add_norm_kernel(1) is not None for m in engine._int4_layers())


def _norm_ahead(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    from bench.quant import triton_f16x2

    if value not in ("0", "1"):
        raise SystemExit(f"--ab norm-ahead value {value!r}: 0 or 1")
    triton_f16x2.NORM_AHEAD = value == "1"  # read at each launch (a constexpr: compiled for each value)
    spec, folds = _fold_norms("1", int4_kernels)
    return spec, lambda engine: triton_f16x2.NORM_AHEAD and folds(engine)


def _fold_gate(value: str, int4_kernels: str) -> tuple[EngineSpec, callable]:
    if value not in ("0", "1"):
        raise SystemExit(f"--ab fold-gate value {value!r}: 0 or 1")
    spec, folds = _fold_norms("1", int4_kernels)

    def on(engine) -> bool:  # read when the step layer is first traced (after this call)
        engine.decoder.fold_gate = value == "1"
        pairs = [b.gate_up.fused for b in engine.decoder.layers]
        return value == "1" and folds(engine) and any(getattr(m, "gate_kernel", lambda rows: None)(1) is not None
                                                      for m in pairs)
    return spec, on


# setting -> (its values by default, value -> (the engine's spec, engine -> whether the value took
# effect, called before the engine runs anything))
SETTINGS = {"pdl": (("off", "auto"), _pdl), "fused-combine": (("0", "1"), _fused_combine),
            "deferred-residual": (("0", "1"), _deferred_residual),
            "pdl-prefetch": (("off", "0", "1", "4"), _pdl_prefetch), "pdl-preload": (("0", "1"), _pdl_preload),
            "pdl-late": (("0", "1"), _pdl_late),
            "f16x2-stages": (("1+3", "1+1w+3+3w"), _f16x2_stages),
            "f16x2-splits": (("none", "2", "2+4"), _f16x2_splits),
            "split-kv": (("combine_chunk=8", "combine_chunk=16"), _split_kv),
            "f16x2-tuning": (("triton", "graph"), _f16x2_tuning), "fold-norms": (("0", "1"), _fold_norms),
            "norm-ahead": (("0", "1"), _norm_ahead), "fold-gate": (("0", "1"), _fold_gate),
            "knockout": (("none", "add-norm", "silu", "kv-write", "attention", "add-norm+silu+attention"), _knockout)}


def _f16x2_configs() -> str:
    """A digest of the configurations triton-f16x2 was tuned to in this process so far (sorted; ""
    where it has not run): the same digest, the same kernels."""
    module = sys.modules.get("bench.quant.triton_f16x2")
    tuned = sorted(map(str, getattr(module, "_TUNED", {}).values()))
    return hashlib.sha1(str(tuned).encode()).hexdigest()[:12] if tuned else ""


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--ab", choices=sorted(SETTINGS), default="pdl")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=float("inf"))
    ap.add_argument("--weights", default="fp16,rtn4")
    ap.add_argument("--int4-kernels", default="triton-f16x2")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--values", help="comma list of the setting's values to time (default: the setting's own)")
    ap.add_argument("--numerics", choices=NUMERICS, default="fused",
                    help="how the compiled layers round (EngineSpec.numerics; default fused, as every A/B up to "
                         "2026-12-07 ran: the graph engine's own default is eager-casts)")
    args = ap.parse_args()
    values, setting = SETTINGS[args.ab]
    values = tuple(args.values.split(",")) if args.values else values
    for value in values:  # a value the setting refuses, refused before any model loads
        setting(value, args.int4_kernels)
    image = demo_image()
    adapters = {weights: preset_adapter(args.preset, weights) for weights in args.weights.split(",")}
    w = CsvWriter(Path(args.out), ["model", "weights", "int4_kernels", "round", "setting", "value", "on", "numerics",
                                   "step_ms", "step_ms_p10", "step_ms_p90", "steps", "tokens_sha", "f16x2_configs"])
    start = time.monotonic()
    for rnd in range(args.rounds):
        if time.monotonic() - start > args.seconds:
            break
        order = values if rnd % 2 == 0 else values[::-1]  # neither always first
        for weights, adapter in adapters.items():
            for value in order:
                torch._dynamo.reset()
                spec, took = setting(value, args.int4_kernels)
                spec = dataclasses.replace(spec, numerics=args.numerics)
                engine = GraphEngine(adapter, CachePolicy(), spec)
                on = bool(took(engine))
                engine.run_batch([(image, QUESTION)], args.new_tokens)  # compiled and captured here
                result = engine.run_batch([(image, QUESTION)], args.new_tokens)
                steps = sorted(result.step_ms)
                q = statistics.quantiles(steps, n=10)
                row = {"model": args.preset, "weights": weights,
                       "int4_kernels": args.int4_kernels if weights != "fp16" else "", "round": rnd,
                       "setting": args.ab, "value": value, "on": on, "numerics": args.numerics,
                       "step_ms": statistics.median(steps), "step_ms_p10": q[0], "step_ms_p90": q[-1],
                       "steps": len(steps),
                       "tokens_sha": hashlib.sha1(str(result.tokens).encode()).hexdigest()[:12],
                       "f16x2_configs": _f16x2_configs()}
                w.write(row)
                print(f"round {rnd} {weights} {args.ab}={value}: {row['step_ms']:.3f} ms "
                      f"(p10 {q[0]:.3f}, p90 {q[-1]:.3f}, {len(steps)} steps, tokens {row['tokens_sha']})", flush=True)
                del engine
                gc.collect()
                torch.cuda.empty_cache()
    w.close()


if __name__ == "__main__":
    main()

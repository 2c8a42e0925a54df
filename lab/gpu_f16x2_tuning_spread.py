"""Does triton-f16x2's tuning choose the same configuration each time it tunes a shape, and what
does another choice cost? Two tunings are compared: Triton's autotuner as the kernel had it up to
b0f85fb (bench.quant.w4a16.base.autotune_bench: each candidate's calls timed one by one after a
write that flushes L2; `triton`) and the kernel's own since (bench.quant.triton_f16x2._tune: each
candidate's calls captured back to back in a CUDA graph over copies of the weight that L2 cannot
hold; `graph`).

For each decoder shape of a preset each tunes `--tunings` times in one process (afresh each time;
PDL on where it runs, as in the engines; the K loops of K_LOOPS), each choice written with the
tuning's own time for it where it gives one (`tuner_us`, `runner_up_us`: Triton's medians). Then
every configuration chosen at least once is timed again by bench.measure.timing.call_us over
copies of the weight that L2 cannot hold (as lab/triton_tiles_h2.py gpu), `--repeats` rounds
alternating between them, so the choices are compared on one footing. `--rep-ms`: the Triton
autotuner's benchmark length (autotune_bench: 10 ms of calls after 5 of warm-up).

    python3 lab/gpu_f16x2_tuning_spread.py --preset llava-1.5-7b --out f16x2_tuning_spread.csv
    python3 lab/gpu_f16x2_tuning_spread.py --preset llava-1.5-7b --rep-ms 50 --out spread_rep50.csv
    python3 lab/gpu_f16x2_tuning_spread.py --preset llava-1.5-7b --triton-tunings 0 --tunings 2 \
        --graph-splits none,2+4 --out f16x2_splits_llava-1.5-7b.csv

--graph-splits: the graph tuning under each choice of bench.quant.triton_f16x2.SPLITS (the K splits
it tries besides none), its `tuning` column naming the choice.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_int4_candidates import shapes_of  # noqa: E402
from gpu_read_ceiling import calls_for  # noqa: E402
from triton_tiles_h2 import weights  # noqa: E402

from bench import pdl  # noqa: E402
from bench.measure.results import CsvWriter  # noqa: E402
from bench.measure.timing import call_us, copies_past_l2  # noqa: E402
from bench.quant import triton_f16x2 as f  # noqa: E402
from bench.quant.w4a16 import choice  # noqa: E402

COLUMNS = ["preset", "shape", "out_features", "in_features", "rep_ms", "tuning", "kind", "index", "config", "tuner_us",
           "runner_up_us", "us", "us_min", "us_max", "int4_gb_per_s"]


def splits_value(text: str) -> tuple:
    """A choice of bench.quant.triton_f16x2.SPLITS as these scripts spell it: none, or splits joined
    by + (2+4); checked by triton_f16x2.splits() where it is set."""
    return () if text == "none" else tuple(int(v) if v.isdigit() else v for v in text.split("+"))


def label(config: dict) -> str:
    """A launch configuration (triton_f16x2.launch_config's) as the CSV names it."""
    return " ".join(f"{k}={v}" for k, v in config.items())


def triton_autotuner(rep_ms: float = 10.0):
    """Triton's autotuner over triton-f16x2's candidates without split, as the kernel had it up to
    b0f85fb (pruned by the K loops of K_LOOPS), its benchmark `rep_ms` long."""
    import triton
    import triton.testing

    def prune(configs, named_args, **kwargs):
        return f._prune(configs, named_args["K"], f.k_loops())

    return triton.autotune(f._configs(split=False), key=["N", "K"], prune_configs_by={"early_config_prune": prune},
                           do_bench=lambda fn, quantiles: triton.testing.do_bench(
                               fn, warmup=rep_ms / 2, rep=rep_ms, quantiles=quantiles))(f._f16x2_kernel)


def triton_tune(autotuner, x32, packed, sz32, n: int, k: int, group_size: int, pdl_launch: dict):
    """Tune afresh with `autotuner` -> [(triton.Config, [median, p20, p80] ms)], fastest first."""
    import triton

    autotuner.cache.clear()
    y = torch.empty(n, dtype=torch.float16, device=x32.device)
    autotuner[lambda meta: (triton.cdiv(n, 8 * meta["TN"]), 1)](x32, packed, sz32, y, None, None, n, k,
                                                                 G=group_size, EMULATE=False, **pdl_launch)
    return sorted(autotuner.configs_timings.items(), key=lambda kv: kv[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--tunings", type=int, default=6)
    ap.add_argument("--triton-tunings", type=int, default=None, help="Triton autotuner's tunings (default --tunings)")
    ap.add_argument("--graph-splits", default=None,
                    help="the graph tuning under each of these SPLITS, comma-separated (none, 2, 2+4; "
                         "default: the module's own)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rep-ms", type=float, default=10.0)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    triton_tunings = args.tunings if args.triton_tunings is None else args.triton_tunings
    choices = [f.splits()] if args.graph_splits is None else [splits_value(v) for v in args.graph_splits.split(",")]
    dev = torch.device("cuda")
    pdl.configure("auto", dev)
    autotuner = triton_autotuner(args.rep_ms)
    pdl_on = pdl.enabled(dev)
    launch = {"PDL": pdl_on, "PREFETCH": 0, "PRELOAD": False, "LATE": pdl_on and bool(pdl.LATE),
              **({"launch_pdl": True} if pdl_on else {})}
    out = CsvWriter(Path(args.out), COLUMNS)
    torch.manual_seed(0)
    for shape, (n, k) in shapes_of(args.preset).items():
        packed, sz, _ = weights(n, k, args.group_size, dev)
        x = torch.randn(1, k, device=dev).half()
        count = copies_past_l2(dev, packed.numel() * 4)
        layers = [(packed.clone(), sz.clone()) for _ in range(count)]
        row = {"preset": args.preset, "shape": shape, "out_features": n, "in_features": k, "rep_ms": args.rep_ms}
        chosen = {}
        x32, sz32 = x.view(torch.int32), layers[0][1].view(torch.int32)
        for i in range(triton_tunings):
            timings = triton_tune(autotuner, x32, layers[0][0], sz32, n, k, args.group_size, launch)
            (best, best_t), (runner, runner_t) = timings[0], timings[1]
            best, runner = f.launch_config(best), f.launch_config(runner)
            chosen.setdefault(label(best), best)
            out.write({**row, "tuning": "triton", "kind": "tuning", "index": i, "config": label(best),
                       "tuner_us": round(best_t[0] * 1e3, 3), "runner_up_us": round(runner_t[0] * 1e3, 3)})
            print(shape, "triton tuning", i, label(best), f"{best_t[0] * 1e3:.3f} us, runner-up {label(runner)} "
                  f"{runner_t[0] * 1e3:.3f} us", flush=True)
        for splits in choices:
            f.SPLITS = splits
            tuning = "graph" if args.graph_splits is None else f"graph splits={'+'.join(map(str, splits)) or 'none'}"
            for i in range(args.tunings):
                config = f._tune(x32, layers[0][0], sz32, n, k, args.group_size, False, launch)
                name = label(config)
                chosen.setdefault(name, config)
                out.write({**row, "tuning": tuning, "kind": "tuning", "index": i, "config": name})
                print(shape, tuning, i, name, flush=True)
        times = {name: [] for name in chosen}
        for _ in range(args.repeats):
            for name, config in chosen.items():
                turn = itertools.cycle(layers)
                times[name].append(call_us(lambda: f.f16x2_mm(x, *next(turn), n, args.group_size, False, config=config),
                                           dev, calls=calls_for(count)))
        for i, (name, us) in enumerate(times.items()):
            med = statistics.median(us)
            out.write({**row, "kind": "retimed", "index": i, "config": name, "us": round(med, 3),
                       "us_min": round(min(us), 3), "us_max": round(max(us), 3),
                       "int4_gb_per_s": round(choice.int4_gb_per_s(n, k, args.group_size, med), 1)})
            print(shape, "retimed", name, f"{med:.3f} us ({min(us):.3f}-{max(us):.3f})", flush=True)
        layers = None
        torch.cuda.empty_cache()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

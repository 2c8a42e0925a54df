"""Where a warm prefix request's host time goes on the graph-exact engine, under the benchmark
run loop's conditions (a full gc, the NVML monitor, 128 new tokens per request): each host call
on the way to the first token, stamped with the host clock (median duration and start, from the
request's start), the benchmark's phases beside them, the host cost of pieces measured alone
(CUDA event creation, the suffix graph's launch, the tokenizer) and a Chrome trace of warm
requests (CPU ops, CUDA runtime calls, kernels) for the timeline of one launch.

    python lab/gpu_warm_host.py --preset llava-1.5-7b --out $OUT/warm_host_llava-1.5-7b.csv \
        [--trace $OUT/warm_host_trace.json] [--engine graph-exact]
"""
from __future__ import annotations

import functools
import gc
import statistics
import time
from pathlib import Path

import torch

from gpu_profile_common import QUESTION, demo_image, profile_parser, suffix_graph_replays

from bench.measure import timing
from bench.run.config import DEMO_IMAGE
from bench.run.monitors import GpuMonitor
from bench.models.loader import build_preset
from bench.measure.results import CsvWriter
from bench.models.visual import VisualInput
from variants import registry
from variants.prefix import PrefixKVPolicy


class Stamps:
    """Host-clock (start, end) of every call of the wrapped functions, per request."""

    def __init__(self):
        self.calls: list[tuple[str, float, float]] = []

    def wrap(self, owner, name: str, label: str | None = None) -> None:
        fn = getattr(owner, name)
        label = label or name

        @functools.wraps(fn)
        def stamped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.calls.append((label, t0, time.perf_counter()))

        setattr(owner, name, stamped)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def conditions_before(monitor: GpuMonitor) -> None:
    """What the benchmark's run loop does before a request (runner: full gc, gc off, monitor)."""
    sync()
    gc.collect()
    gc.disable()
    monitor.start()


def main() -> None:
    ap = profile_parser("llava-1.5-7b")
    ap.add_argument("--engine", default="graph-exact")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (tiny preset, static engine)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--trace", default=None)
    args = ap.parse_args()
    image = demo_image()
    visual = VisualInput((image,), encoded=(Path(DEMO_IMAGE).read_bytes(),))  # as the benchmark's requests
    adapter = build_preset(args.preset, None, torch.device(args.device),
                           torch.float16 if args.device == "cuda" else torch.float32)
    policy = PrefixKVPolicy(4096)
    engine = registry()[args.engine].make_engine(adapter, policy)
    engine.run(visual, QUESTION, 4)  # cold: stores the prefix
    engine.run(visual, QUESTION, 128)  # warm: the suffix graph and every decode length captured
    w = CsvWriter(Path(args.out), ["model", "engine", "what", "name", "ms", "start_ms", "n"])
    who = {"model": args.preset, "engine": args.engine}
    monitor = GpuMonitor(torch.cuda.current_device() if args.device == "cuda" else None)

    stamps = Stamps()
    for owner, names in [(adapter, ["prepare_text", "_tokenize", "_tokenize_fixed"]),
                         (policy, ["lookup_prefix", "key"]),
                         (engine, ["new_cache", "restore_prefixes", "_suffix_prefill", "suffix_token",
                                   "_suffix_inputs", "_suffix_token_call", "key_len"]),
                         (timing.Timeline, ["mark"]),
                         (torch.cuda.CUDAGraph, ["replay"]),
                         (torch.Tensor, ["tolist"])]:
        for name in names:
            stamps.wrap(owner, name, f"{type(owner).__name__ if not isinstance(owner, type) else owner.__name__}"
                                     f".{name}")
    per: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    phases: dict[str, list[float]] = {}
    for _ in range(args.reps):
        conditions_before(monitor)
        stamps.calls.clear()
        t0 = time.perf_counter()
        r = engine.run(visual, QUESTION, 128)
        monitor.stop()
        gc.enable()
        assert r.cache_hit
        for k, v in r.phases_ms.items():
            phases.setdefault(k, []).append(v)
        ttft_end = next(t1 for label, _, t1 in stamps.calls if label.endswith("_suffix_prefill"))
        seen: dict[str, float] = {}
        first: dict[str, float] = {}
        for label, a, b in stamps.calls:
            if b <= ttft_end:
                seen[label] = seen.get(label, 0.0) + (b - a) * 1e3
                first.setdefault(label, (a - t0) * 1e3)
        for label, ms in seen.items():
            per.setdefault(label, []).append(ms)
            starts.setdefault(label, []).append(first[label])
        per.setdefault("request start -> first token on host", []).append((ttft_end - t0) * 1e3)
        starts.setdefault("request start -> first token on host", []).append(0.0)
    for k, v in phases.items():
        if k != "decode":
            w.write({**who, "what": "benchmark phase (median)", "name": k, "ms": statistics.median(v), "start_ms": "",
                     "n": len(v)})
    print("phases:", {k: round(statistics.median(v), 3) for k, v in phases.items() if k != "decode"}, flush=True)
    for label in sorted(per, key=lambda k: statistics.median(starts[k])):
        ms, st = statistics.median(per[label]), statistics.median(starts[label])
        w.write({**who, "what": "host call to the first token (summed per request, median)", "name": label,
                 "ms": ms, "start_ms": st, "n": len(per[label])})
        print(f"  start {st:7.3f} ms  took {ms:7.3f} ms  {label}", flush=True)

    # Pieces alone: the host cost of a timing event, of the suffix graph's launch, of tokenizing.
    def host_us(fn, reps=200, before=None) -> float:
        out = []
        for _ in range(reps):
            if before is not None:
                sync()
                before()
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e6)
        return statistics.median(out)

    def event_record():
        torch.cuda.Event(enable_timing=True).record()

    pooled = torch.cuda.Event(enable_timing=True) if args.device == "cuda" else None
    tok = adapter.tokenizer
    text = "".join(adapter.template.split(QUESTION, "<image>\n"))
    tail = text[text.rindex("<image>"):]
    pieces = {} if args.device != "cuda" else {
        "new CUDA event + record": lambda: event_record(),
        "record of an existing CUDA event": lambda: pooled.record(),
    }
    pieces |= {
        "tokenizer(text).input_ids (transformers)": lambda: tok(text, add_special_tokens=False).input_ids,
        "backend_tokenizer.encode(text).ids": lambda: tok.backend_tokenizer.encode(text, add_special_tokens=False).ids,
        "backend_tokenizer.encode(text from <image>).ids":
            lambda: tok.backend_tokenizer.encode(tail, add_special_tokens=False).ids,
        "prepare_text": lambda: adapter.prepare_text(QUESTION, visual),
        "content_digest": lambda: visual.content_digest(),
        "lookup_prefix": lambda: policy.lookup_prefix(adapter, adapter.prepare_text(QUESTION, visual), visual),
    }
    befores = {"": None, ", after a 50 ms sleep": lambda: time.sleep(0.05), ", after a full gc.collect()": gc.collect}
    for name, fn in pieces.items():
        for tag, before in befores.items():
            us = host_us(fn, 200 if before is None else 20, before)
            w.write({**who, "what": f"host cost alone (median){tag}", "name": name, "ms": us / 1e3, "start_ms": "",
                     "n": ""})
            print(f"  {us:8.1f} us  {name}{tag}", flush=True)

    if hasattr(engine, "lm_graphs"):
        for sleep in (0.0, 0.05):
            replays = suffix_graph_replays(engine, r.cached_tokens, before=(lambda: time.sleep(sleep)) if sleep else None)
            tag = ", after a 50 ms sleep" if sleep else ""
            for key, (launch, gpu) in replays.items():
                for name, v in (("replay() host call", launch), ("events around replay()", gpu)):
                    w.write({**who, "what": f"suffix graph ({key[1]} tokens, {key[2]} keys){tag}", "name": name,
                             "ms": statistics.median(v), "start_ms": "", "n": len(v)})
                print(f"suffix graph {key}{tag}: launch {statistics.median(launch):.3f} ms on the host, "
                      f"{statistics.median(gpu):.3f} ms between events", flush=True)

    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        engine.run(visual, QUESTION, 128)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                conditions_before(monitor)
                engine.run(visual, QUESTION, 2)
                monitor.stop()
                gc.enable()
                time.sleep(0.3)
        prof.export_chrome_trace(args.trace)
        print("trace:", args.trace, flush=True)
    w.close()


if __name__ == "__main__":
    main()

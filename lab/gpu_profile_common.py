"""What the GPU profiling scripts share: a preset on the graph engine after one real request,
and CUDA kernel time by kernel name (torch.profiler)."""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engines.cache_policy import CachePolicy  # noqa: E402
from bench.quiet import quiet_libraries  # noqa: E402
from bench.run.config import DEMO_IMAGE  # noqa: E402
from bench.models.loader import build_preset  # noqa: E402
from bench.engines.graph import GraphEngine  # noqa: E402

QUESTION = "What is shown in this image?"


class _InductorSetting(argparse.Action):
    """--inductor NAME=VALUE: set torch._inductor.config's NAME (dotted: triton.enable_pdl) to the
    integer VALUE before anything compiles (e.g. combo_kernels=1; PDL is the engines' --pdl, which
    sets triton.enable_pdl when an engine is made)."""

    def __call__(self, parser, namespace, text, option_string=None):
        from torch._inductor import config as inductor_config

        name, _, value = text.partition("=")
        if name == "triton.enable_pdl":  # each engine sets it from its spec when made
            parser.error("--inductor triton.enable_pdl: give --pdl auto|off, which the engine applies")
        owner, _, leaf = name.rpartition(".")
        target = inductor_config
        for part in filter(None, owner.split(".")):
            target = getattr(target, part, None)
        current = getattr(target, leaf, None) if target is not None else None
        if not isinstance(current, (bool, int)) or not value.lstrip("-").isdigit():
            parser.error(f"--inductor {text!r}: not NAME=INTEGER of a boolean or integer inductor setting "
                         "this torch has")
        setattr(target, leaf, type(current)(int(value)))
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), text])


def profile_parser(preset: str) -> argparse.ArgumentParser:
    """--preset and --out, which every profiling script takes, and --inductor settings."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=preset)
    ap.add_argument("--out", required=True)
    ap.add_argument("--inductor", action=_InductorSetting, default=[], metavar="NAME=VALUE",
                    help="an inductor setting for this process (repeatable), e.g. combo_kernels=1")
    return ap


def demo_image():
    """The bundled demo image as RGB (library log noise silenced first)."""
    from PIL import Image

    quiet_libraries()
    return Image.open(DEMO_IMAGE).convert("RGB")


def event_times_ms(fn, reps: int) -> list[float]:
    """Wall time of each of `reps` calls of `fn`, CUDA events around the call."""
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def suffix_graph_replays(engine, start: int, reps: int = 20, before=None) -> dict:
    """Each captured suffix graph that can run after a `start`-token prefix (its keys reach
    start + its length), replayed alone `reps` times from column `start` (the start column its
    staged inputs carry, which the graph copies in): {graph key: (host ms of each replay() call,
    ms between CUDA events around it)}. `before` runs ahead of each replay (e.g. a sleep); the
    buffers' positions are restored afterwards."""
    out = {}
    with torch.inference_mode():  # the engine's buffers are inference tensors
        saved = engine.cache.positions()
        for key, cap in engine.lm_graphs.items():
            if key[0] != "suffix ids" or start + key[1] > key[2]:
                continue  # (a graph for another prefix length: replaying it here would write past its keys)
            engine._suffix_inputs(key[1], key[3])[1][key[3] * key[1] + 1] = start
            launch, gpu = [], []
            for _ in range(reps):
                torch.cuda.synchronize()
                if before is not None:
                    before()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                t = time.perf_counter()
                cap.graph.replay()
                launch.append((time.perf_counter() - t) * 1e3)
                b.record()
                torch.cuda.synchronize()
                gpu.append(a.elapsed_time(b))
            out[key] = (launch, gpu)
        engine.cache.set_positions(saved)
    return out


def graphed_us(fn, calls: int = 32, reps: int = 20, warmup: int = 3) -> float:
    """Median GPU time of one call of `fn`, `calls` of them captured back to back in one CUDA
    graph and replayed `reps` times (bench.measure.timing.call_us, what the measured int4 kernel
    choice times with)."""
    from bench.measure.timing import call_us

    return call_us(fn, torch.device("cuda"), calls, reps, warmup)


def compiled_matmul_attention(heads: int, kv_heads: int, head_dim: int):
    """FastDecoder._matmul_attention for these dimensions, compiled as the graph engine's steps
    compile it."""
    from types import SimpleNamespace

    from bench.engines.decoder import FastDecoder

    cfg = SimpleNamespace(model_type="llama", num_attention_heads=heads, num_key_value_heads=kv_heads,
                          hidden_size=heads * head_dim)
    dec = FastDecoder(SimpleNamespace(embed_tokens=None, norm=None, rotary_emb=None, layers=[]), None, cfg)
    return torch.compile(dec._matmul_attention, dynamic=False)


def preset_adapter(preset: str, weights: str = "fp16"):
    """The preset on CUDA in fp16 (random weights), its decoder linears round-to-nearest int4
    (group 128) when `weights` is "rtn4" (awq4 runs the same kernels)."""
    adapter = build_preset(preset, None, torch.device("cuda"), torch.float16)
    if weights == "rtn4":
        from bench.quant.awq import Int4Options, quantize_model

        quantize_model(adapter, Int4Options(method="rtn", group_size=128))
    elif weights != "fp16":
        raise SystemExit(f"--weights: fp16 or rtn4, got {weights!r}")
    return adapter


def graph_engine_after_one_request(preset: str, new_tokens: int, weights: str = "fp16", spec=None,
                                   batch: int = 1):
    """(adapter, engine, image, result): the preset on CUDA in fp16, its decoder linears
    round-to-nearest int4 (group 128) when `weights` is "rtn4" (awq4 runs the same kernels), on
    the graph engine with `spec` (an EngineSpec: e.g. its int4 kernels), one request run (graphs
    captured), or one batch of `batch` requests (the engine's buffers then hold `batch` rows)."""
    image = demo_image()
    adapter = preset_adapter(preset, weights)
    engine = GraphEngine(adapter, CachePolicy(), spec)
    return adapter, engine, image, engine.run_batch([(image, QUESTION)] * batch, new_tokens)


def kernel_times(fn, reps: int) -> dict[str, tuple[float, float]]:
    """CUDA kernel name -> (ms, launches) per call of `fn`, over `reps` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += e.device_time_total / 1e3
            per[e.name][1] += 1
    return {name: (ms / reps, n / reps) for name, (ms, n) in per.items()}

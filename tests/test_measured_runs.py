"""What makes a measured run trustworthy: no compilation or capture inside one (counted, left
out, replaced), warm-ups that cover a cache's cold and warm shapes, validity that says why,
the host's threads and garbage collection, and where images are processed."""
import csv
import gc
import json

import pytest
import torch

from bench.cli import run_main
from bench.engines.hf import HFEngine
from bench.measure import compile_events
from bench.models.loader import build_preset
from bench.run import host
from bench.run.preprocess import place_preprocessing
from tests.conftest import on_run_batch_call
from bench.run.runner import Benchmark
from bench.run.summary import ValidityRule, summarize_runs

BASE = ["--preset", "tiny-vila", "--device", "cpu", "--num-runs", "4", "--min-seconds", "0", "--max-new-tokens", "4",
        "--warmup", "1", "--no-fidelity", "--text-prompt", "What is here?"]


def _rows(out, name="runs.csv"):
    return list(csv.DictReader(open(out / name)))


def test_a_run_that_compiles_is_recorded_left_out_and_replaced(tmp_path, monkeypatch):
    # two warm-ups (one generic, one shape-matched), then the 2nd measured run
    on_run_batch_call(monkeypatch, {4: compile_events.note_capture})
    out = tmp_path / "o"
    assert run_main([*BASE, "--variants", "fp16", "--output-dir", str(out)]) == 0
    measured = [r for r in _rows(out) if r["kind"] == "measured"]
    assert [r["compiles"] for r in measured] == ["0", "1", "0", "0", "0"]  # 4 clean runs, one more made
    ttft = next(s for s in _rows(out, "summary.csv") if s["metric"] == "ttft_ms")
    assert (ttft["n"], ttft["excluded"]) == ("4", "1")
    clean = sorted(float(r["ttft_ms"]) for r in measured if r["compiles"] == "0")
    assert float(ttft["median"]) == pytest.approx((clean[1] + clean[2]) / 2, abs=1e-2)  # cells are rounded

    from bench.analysis.compare import load_runs  # compare leaves it out too
    assert len(load_runs(out)) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton compiles for a GPU)")
def test_a_triton_compilation_outside_torch_compile_is_counted():
    """A Triton kernel's JIT compilation (gemlite's autotuning compiles this way) counts as one-time
    work, like torch.compile's: a measured run that met one is left out."""
    import triton
    import triton.language as tl

    @triton.jit
    def scaled(x_ptr, n, k: tl.constexpr, block: tl.constexpr):
        i = tl.program_id(0) * block + tl.arange(0, block)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * k, mask=i < n)

    x = torch.ones(64, device="cuda")
    before = compile_events.count()
    scaled[(1,)](x, 64, k=3, block=64)  # a constexpr never compiled before: a new kernel
    torch.cuda.synchronize()
    assert compile_events.count() > before
    again = compile_events.count()
    scaled[(1,)](x, 64, k=3, block=64)  # compiled already: nothing new
    assert compile_events.count() == again and x[0].item() == 9


def test_a_cache_is_warmed_up_cold_and_warm_for_each_measured_shape(tmp_path):
    out = tmp_path / "o"
    assert run_main([*BASE, "--variants", "prefix", "--output-dir", str(out)]) == 0
    warmups = [r for r in _rows(out) if r["kind"] == "warmup"]
    # the generic warm-up (cold: the cache is empty), then the shape-matched one cold, then warm
    assert [(r["cache_state"], r["cache_hit"]) for r in warmups] == [
        ("cold", "false"), ("cold", "false"), ("warm", "true")]
    assert all(r["question"] != "What is here?" for r in warmups)


def test_a_batchs_warm_ups_hold_the_measured_batches_prompt_lengths_row_by_row(tmp_path, monkeypatch):
    """The graph engines capture per batch shape (rows of one suffix length, or of several): each
    measured batch's sequence of prompt lengths is met by a warm-up batch of other questions, cold
    and then warm, so no measured run is the first to meet it."""
    real, seen = HFEngine.run_batch, []

    def recording(self, requests, new_tokens):
        seen.append([len(self.adapter.prepare_text(q).suffix_ids) for _, q in requests])
        seen[-1].append(tuple(q for _, q in requests))
        return real(self, requests, new_tokens)

    monkeypatch.setattr(HFEngine, "run_batch", recording)
    questions = tmp_path / "q.txt"
    questions.write_text("What is here?\nWhat colour is the large shape in the middle of the picture?\n")
    out = tmp_path / "o"
    flags = [a for a in BASE if a not in ("--text-prompt", "What is here?")]
    assert run_main([*flags, "--variants", "prefix", "--batch-size", "3", "--questions", str(questions),
                     "--output-dir", str(out)]) == 0
    kinds = [r["kind"] for r in _rows(out)]
    warm, measured = [seen[i] for i, k in enumerate(kinds) if k == "warmup"], \
        [seen[i] for i, k in enumerate(kinds) if k == "measured"]
    asked = set(questions.read_text().splitlines())
    shapes = {tuple(m[:-1]) for m in measured}
    assert len(shapes) == 2  # 3 rows of 2 questions cyclically: (a, b, a) then (b, a, b)
    matched = [w for w in warm if tuple(w[:-1]) in shapes]
    assert {tuple(w[:-1]) for w in matched} == shapes and len(matched) == 2 * 2  # each cold, then warm
    assert not any(set(w[-1]) & asked for w in warm)  # never a measured question


def _group(cv_phase_ms: list[float], n=6):
    rows = []
    for i in range(n):
        pre = cv_phase_ms[i % len(cv_phase_ms)]
        rows.append({"model": "m", "variant": "fp16", "engine": "graph", "status": "ok", "kind": "measured",
                     "cache_state": "none", "run_id": "r", "compiles": 0, "preprocess_ms": pre,
                     "vision_ms": 4.0 + 0.01 * i, "prefill_ms": 4.0, "ttft_ms": pre + 8.0 + 0.01 * i,
                     "tpot_ms": 2.5, "e2e_ms": 300.0})
    return rows


def test_an_invalid_summary_says_why_and_names_its_noisiest_phase():
    cfg = ValidityRule(num_runs=10, min_seconds=1.0, max_cv=0.10)
    summary = summarize_runs(_group([2.0, 30.0]), cfg)
    by_metric = {s["metric"]: s for s in summary}
    ttft = by_metric["ttft_ms"]
    assert not ttft["valid"]
    assert "6 runs < --num-runs 10" in ttft["invalid_reason"]
    assert "cv " in ttft["invalid_reason"] and "noisiest phase preprocess_ms" in ttft["invalid_reason"]
    tpot = by_metric["tpot_ms"]  # steady, but too few runs
    assert tpot["invalid_reason"] == "6 runs < --num-runs 10"
    cfg = ValidityRule(num_runs=6, min_seconds=1.0, max_cv=0.10)
    assert {s["metric"]: s for s in summarize_runs(_group([2.0, 2.0]), cfg)}["ttft_ms"]["invalid_reason"] == ""


def test_an_endpoint_point_that_queues_by_design_is_not_judged_by_its_spread():
    """Several requests in flight, or Poisson arrivals: the spread is the server's queueing, what the
    point measures; one request at a time, back to back: a spread is noise, as in-process."""
    cfg = ValidityRule(num_runs=6, min_seconds=0.0, max_cv=0.10)

    def point(concurrency, rate):
        return [{**r, "engine": "endpoint", "concurrency": concurrency, "request_rate": rate}
                for r in _group([2.0, 30.0])]

    def ttft(rows):
        return {s["metric"]: s for s in summarize_runs(rows, cfg)}["ttft_ms"]

    assert not ttft(point(1, "inf"))["valid"] and "cv " in ttft(point(1, "inf"))["invalid_reason"]
    for concurrency, rate in ((4, "inf"), (1, 2.0), ("4", "8.0")):  # read back from runs.csv: text
        queued = ttft(point(concurrency, rate))
        assert queued["valid"] and queued["invalid_reason"] == "" and queued["cv"] > 0.1
    assert not ttft([{**r, "concurrency": 4} for r in _group([2.0, 30.0])])["valid"]  # in-process rows: judged
    short = ValidityRule(num_runs=10, min_seconds=0.0, max_cv=0.10)  # too few requests: still invalid,
    # in endpoint mode's terms (it takes no --num-runs)
    assert {s["metric"]: s for s in summarize_runs(point(4, "inf"), short)}["ttft_ms"]["invalid_reason"] == \
        "6 requests < --num-prompts 10"


def test_host_threads_and_preprocessing_are_recorded(tmp_path):
    out = tmp_path / "o"
    assert run_main([*BASE, "--variants", "fp16", "--cpu-threads", "1", "--output-dir", str(out)]) == 0
    env = json.loads((out / "env.json").read_text())
    assert env["host"]["cpu_threads"] == 1 and "gc.freeze" in env["host"]["gc"]
    assert env["host"]["allocator"] == host.pin_allocator()
    assert env["preprocess"]["fp16"]["device"] == "cpu"
    assert env["preprocess"]["fp16"]["why"] == "the model runs on the CPU"
    assert {r["preprocess_device"] for r in _rows(out)} == {"cpu"}


_FAULTS = """
import resource, sys, torch
from bench.run import host
if sys.argv[1] == "pinned":
    host.pin_allocator()
for _ in range(20):  # the heap settles (its first blocks are new pages either way)
    torch.empty(1 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(1 << 20).fill_(1.0)  # 4 MiB, touched, freed
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_pinned_allocator_reuses_freed_blocks_instead_of_faulting_in_new_pages():
    """Page faults counted, not time: with glibc's mmap threshold low (as a process's history can
    leave it), every 4 MiB block is fresh pages (about 1,000 faults each); pinned, the freed block
    is reused."""
    import os
    import subprocess
    import sys

    if not host.pin_allocator().startswith("glibc"):
        pytest.skip("glibc malloc only")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("default", "pinned")}
    assert faults["default"] > 10 * 500 and faults["pinned"] < 500, faults


@pytest.mark.parametrize("flags, message", [
    (["--cpu-threads", "-1"], "--cpu-threads"), (["--preprocess", "gpu"], "--preprocess"),
])
def test_bad_host_flags_are_usage_errors(tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert run_main([*BASE, "--variants", "fp16", *flags, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_a_processor_that_cannot_take_the_device_stays_on_the_host(demo_image):
    adapter = build_preset("tiny-vila", None, torch.device("cpu"), torch.float32)
    if type(adapter.image_processor).__name__.endswith("Pil"):  # no torchvision here: PIL processor
        facts = place_preprocessing(adapter, "device", torch.device("meta"), demo_image)  # any non-host device
        assert facts["device"] == "cpu" and "not torchvision-backed" in facts["why"]
        assert adapter.preprocess_device is None
    assert place_preprocessing(adapter, "cpu", torch.device("cuda"), demo_image)["why"] == "--preprocess cpu"
    assert adapter.preprocess_device is None


def test_garbage_collection_discipline():
    host.before_warmup()
    try:
        assert gc.get_freeze_count() > 0  # the model's heap is out of the collector's reach
        with host.one_request():
            assert not gc.isenabled()
        assert gc.isenabled()
    finally:
        host.release_frozen()
    assert gc.get_freeze_count() == 0


def test_no_garbage_is_collected_while_a_cuda_graph_is_captured(monkeypatch):
    """bench.measure.capture: the collector is off inside every capture (a graph destroyed by a
    collection there would break it) and as it was after, an exception inside included. torch's
    own capture context is stood in for: this machine has no CUDA device."""
    import contextlib

    from bench.measure.capture import capturing

    seen = []

    @contextlib.contextmanager
    def graph(g, **options):
        seen.append((g, options, gc.isenabled()))
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    with capturing("g", pool="p"):
        assert not gc.isenabled()
    assert gc.isenabled() and seen == [("g", {"pool": "p"}, False)]
    with pytest.raises(ValueError), capturing("h"):
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with capturing("i"):
            pass
        assert not gc.isenabled()  # left as it was
    finally:
        gc.enable()


def test_gpu_monitor_averages_the_driver_samples_of_the_request_only():
    """NVML samples (the library's own structs) before the request's start are left out; no GPU
    here means no readings at all, never an error."""
    import pynvml

    from bench.run.monitors import GpuMonitor, GpuSample, mean_since

    samples = (pynvml.c_nvmlSample_t * 3)()
    for s, (t, v) in zip(samples, [(100, 90), (200, 40), (300, 60)]):
        s.timeStamp, s.sampleValue.uiVal = t, v
    assert mean_since(pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, samples, 150) == 50.0
    assert mean_since(pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, samples, 301) is None
    monitor = GpuMonitor(None)
    monitor.start()
    assert not monitor.available and monitor.stop() == GpuSample()


def test_an_engine_in_a_reference_cycle_is_freed_before_the_next_one_is_made(tmp_path, monkeypatch):
    """On CUDA every engine (the fidelity reference's and probe's, each variant's) is freed once
    done, even held in a reference cycle under a frozen heap and with the next variant reusing the
    loaded weights: left to a later collection, its device memory would sit beside the next
    engine's and a CUDA graph it holds could be destroyed inside another capture, which breaks
    that capture (bench.measure.capture)."""
    import weakref

    made, alive_at_make = [], []
    init = HFEngine.__init__

    def in_a_cycle(self, *args, **kwargs):
        alive_at_make.append(sum(ref() is not None for ref in made))
        init(self, *args, **kwargs)
        self.itself = self  # a reference cycle, as compiled closures and hooks make
        made.append(weakref.ref(self))

    monkeypatch.setattr(HFEngine, "__init__", in_a_cycle)
    monkeypatch.setattr(Benchmark, "FREE_ENGINES_ON", ("cuda", "cpu"))  # as on CUDA (this machine has none)
    out = tmp_path / "o"
    flags = [f for f in BASE if f != "--no-fidelity"]
    assert run_main([*flags, "--variants", "fp16,prefix", "--output-dir", str(out)]) == 0
    assert {r["status"] for r in _rows(out)} == {"ok"}
    # the reference, then per variant the probe and the measured runs' engine
    assert len(made) == 5 and alive_at_make == [0] * 5


def test_an_engine_of_a_variant_skipped_midway_is_freed_before_the_next_one_is_made(tmp_path, monkeypatch):
    """A variant found unsupported after its engine was made (on CUDA: a graph its fidelity probe
    cannot capture; stood in for here by the probe refusing the prefix variant) is skipped, and
    its engine, in a reference cycle, is freed before the next variant's is made, as a finished
    variant's is. The automatic collector is off, so only the runner's own collections free it."""
    import weakref

    from bench.errors import VariantUnsupported
    from bench.run import fidelity

    made, alive_at_make = [], []
    init, compare = HFEngine.__init__, fidelity.compare

    def in_a_cycle(self, *args, **kwargs):
        alive_at_make.append(sum(ref() is not None for ref in made))
        init(self, *args, **kwargs)
        self.itself = self
        made.append(weakref.ref(self))

    def refusing_prefix(reference, engine, visual):
        columns = compare(reference, engine, visual)  # the probe ran: its engine did work
        if engine.policy.stateful:
            raise VariantUnsupported("the prefix variant's probe cannot be captured here")
        return columns

    monkeypatch.setattr(HFEngine, "__init__", in_a_cycle)
    monkeypatch.setattr(Benchmark, "FREE_ENGINES_ON", ("cuda", "cpu"))  # as on CUDA (this machine has none)
    monkeypatch.setattr(fidelity, "compare", refusing_prefix)
    out = tmp_path / "o"
    flags = [f for f in BASE if f != "--no-fidelity"]
    enabled = gc.isenabled()
    gc.disable()
    try:
        assert run_main([*flags, "--variants", "prefix,fp16", "--output-dir", str(out)]) == 0
    finally:
        if enabled:
            gc.enable()
    rows = _rows(out)
    assert {(r["variant"], r["status"]) for r in rows} == {("prefix", "skipped"), ("fp16", "ok")}
    # the reference, the prefix probe's (skipped), then fp16's probe and measured runs' engine
    assert len(made) == 4 and alive_at_make == [0] * 4

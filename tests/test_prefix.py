"""Prefix KV reuse and the image-embedding cache: same tokens as no reuse, right hits and misses."""
import csv
import dataclasses
import re

import pytest
import torch
from PIL import Image

from bench.engines.cache_policy import CachePolicy
from bench.cli import run_main
from bench.engines.hf import HFEngine
from bench.engines.lru import ByteLRU
from bench.models.loader import build_preset, load_checkpoint
from bench.models.templates import TEMPLATES
from variants.prefix import ImageEmbedPolicy, PrefixKVPolicy

CPU = torch.device("cpu")
N = 32


@pytest.mark.parametrize("conv", sorted(TEMPLATES))
@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
@pytest.mark.parametrize("policy_cls", [PrefixKVPolicy, ImageEmbedPolicy])
def test_reuse_gives_same_greedy_tokens(family, conv, policy_cls, checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs[family], conv, CPU, torch.float32)
    plain = HFEngine(adapter, CachePolicy())
    cached = HFEngine(adapter, policy_cls(64))
    cold = cached.run(demo_image, "Warm-up: what is this?", N)
    assert not cold.cache_hit
    for q in ("What is shown here?", "Describe the colors in detail."):
        warm = cached.run(demo_image, q, N)
        assert warm.cache_hit
        assert warm.tokens == plain.run(demo_image, q, N).tokens
        if policy_cls is PrefixKVPolicy:
            assert warm.cached_tokens == warm.prefix_tokens
            assert warm.phases_ms.get("vision", 0.0) == 0.0  # vision tower skipped
        else:
            assert warm.cached_tokens == 0  # the LLM still prefills every token


def test_changed_pixels_same_path_is_a_miss(tmp_path, checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs["vila"], None, CPU, torch.float32)
    policy = PrefixKVPolicy(64)
    engine = HFEngine(adapter, policy)
    path = tmp_path / "img.png"
    demo_image.save(path)
    assert not engine.run(Image.open(path).convert("RGB"), "q one", 4).cache_hit
    assert engine.run(Image.open(path).convert("RGB"), "q two", 4).cache_hit
    changed = demo_image.copy()
    changed.putpixel((10, 10), (0, 0, 0))
    changed.save(path)
    r = engine.run(Image.open(path).convert("RGB"), "q three", 4)
    assert not r.cache_hit and r.cached_tokens == 0
    assert r.tokens == HFEngine(adapter, CachePolicy()).run(Image.open(path).convert("RGB"), "q three", 4).tokens


def test_changed_system_prompt_is_a_miss(checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs["llava"], "vicuna_v1", CPU, torch.float32)
    policy = PrefixKVPolicy(64)
    engine = HFEngine(adapter, policy)
    engine.run(demo_image, "a", 4)
    assert engine.run(demo_image, "b", 4).cache_hit
    adapter.template = dataclasses.replace(adapter.template, system="You are a terse assistant.")
    r = engine.run(demo_image, "c", 4)
    assert not r.cache_hit
    assert r.tokens == HFEngine(adapter, CachePolicy()).run(demo_image, "c", 4).tokens


def test_other_model_is_a_miss(demo_image):
    policy = PrefixKVPolicy(64)
    a = build_preset("tiny-vila", None, CPU, torch.float32, seed=0)
    b = build_preset("tiny-vila", None, CPU, torch.float32, seed=1)  # same name, other weights
    HFEngine(a, policy).run(demo_image, "a", 4)
    assert HFEngine(a, policy).run(demo_image, "b", 4).cache_hit
    rb = HFEngine(b, policy).run(demo_image, "b", 4)
    assert not rb.cache_hit
    assert rb.tokens == HFEngine(b, CachePolicy()).run(demo_image, "b", 4).tokens
    other_weights = PrefixKVPolicy(64, weights_key=("bnb4",))  # same model, other weights variant,
    other_weights.lru = policy.lru  # one store
    assert HFEngine(b, policy).run(demo_image, "c", 4).cache_hit
    assert not HFEngine(b, other_weights).run(demo_image, "c", 4).cache_hit


def test_lru_evicts_by_bytes_and_never_crosses_keys():
    lru = ByteLRU(100)
    assert lru.put("a", "A", 40) and lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # a is now most recent
    assert lru.put("c", "C", 40)  # evicts b (least recently used), not a
    assert "b" not in lru and lru.get("b") is None
    assert lru.get("a") == "A" and lru.get("c") == "C"
    assert lru.bytes == 80 and lru.evictions == 1
    assert not lru.put("huge", "H", 101) and "huge" not in lru and lru.bytes == 80
    assert lru.put("a", "A2", 60)  # replacing a key frees its old bytes first
    assert lru.get("a") == "A2" and lru.bytes <= 100
    for key in ("x", ("a",), "A"):
        assert lru.get(key) is None


def test_prefix_cache_respects_byte_budget(checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs["vila"], None, CPU, torch.float32)
    policy = PrefixKVPolicy(1e-3)  # ~1 KB: smaller than any prefix
    engine = HFEngine(adapter, policy)
    engine.run(demo_image, "a", 2)
    assert not engine.run(demo_image, "b", 2).cache_hit
    assert policy.lru.rejected == 2 and len(policy.lru) == 0
    assert policy.refusal().startswith("--prefix-cache-mb 0.001 cannot hold one prefix's keys and values (")
    policy.clear()
    assert policy.refusal() is None


def test_cold_runs_stop_by_the_same_rule_as_warm_ones(tmp_path):
    """--num-runs runs and --min-seconds: a cold group of exactly --num-runs runs was never valid
    where those runs took less than --min-seconds."""
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-vila", "--device", "cpu", "--variants", "prefix", "--num-runs", "2",
                     "--max-new-tokens", "4", "--min-seconds", "0.3", "--warmup", "0", "--no-fidelity",
                     "--output-dir", str(out)]) == 0
    summary = [s for s in csv.DictReader(open(out / "summary.csv")) if s["metric"] == "ttft_ms"]
    assert {s["cache_state"] for s in summary} == {"cold", "warm"}
    for s in summary:  # past --min-seconds, or stopped at --max-runs (20 x --num-runs) short of it
        assert int(s["n"]) == 40 or (float(s["measured_s"]) >= 0.3 and "--min-seconds" not in s["invalid_reason"]), s


def test_a_cache_too_small_for_one_entry_fails_its_point_instead_of_warm_rows_that_never_hit(tmp_path):
    """Its cold rows stand (what they measure happened); the warm group is a failed row saying
    which flag to raise, never "warm" rows of cold requests."""
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-vila", "--device", "cpu", "--variants", "prefix,embedcache", "--num-runs", "2",
                     "--max-new-tokens", "4", "--min-seconds", "0", "--warmup", "0", "--no-fidelity",
                     "--prefix-cache-mb", "0.0001", "--output-dir", str(out)]) == 1
    rows = list(csv.DictReader(open(out / "runs.csv")))
    for variant in ("prefix", "embedcache"):
        mine = [r for r in rows if r["variant"] == variant]
        assert {r["cache_state"] for r in mine if r["status"] == "ok"} == {"cold"}
        failed = [r for r in mine if r["status"] == "failed"]
        assert len(failed) == 1 and "--prefix-cache-mb 0.0001 cannot hold one" in failed[0]["error"], failed
        size = re.search(r"\(([\d,.]+) (MiB|bytes)\)", failed[0]["error"])  # its size, never "0.00 MiB"
        assert size and float(size[1].replace(",", "")) * (2**20 if size[2] == "MiB" else 1) > 0.0001 * 2**20


def test_cold_and_warm_rows_and_ttft_gain(tmp_path):
    """Warm prefix rows hit and skip the prefix's work: their TTFT in process CPU time (one thread,
    so another program's load on this machine barely changes it) is well under fp16's."""
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-llava", "--variants", "fp16,embedcache,prefix", "--num-runs", "8",
                     "--max-new-tokens", "4", "--min-seconds", "0", "--cpu-threads", "1", "--device", "cpu",
                     "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    measured = [r for r in rows if r["kind"] == "measured"]
    prefix = [r for r in measured if r["variant"] == "prefix"]
    assert {r["cache_state"] for r in prefix} == {"cold", "warm"}
    assert all(r["cache_hit"] == "false" and r["cached_tokens"] == "0" for r in prefix if r["cache_state"] == "cold")
    assert all(r["cache_hit"] == "true" and r["cached_tokens"] == r["prefix_tokens"]
               for r in prefix if r["cache_state"] == "warm")
    assert all(r["cache_state"] == "none" for r in measured if r["variant"] == "fp16")
    summary = list(csv.DictReader(open(out / "summary.csv")))
    ttft = {(s["variant"], s["cache_state"]): float(s["median"]) for s in summary if s["metric"] == "cpu_ttft_ms"}
    assert set(ttft) == {("fp16", "none"), ("embedcache", "cold"), ("embedcache", "warm"), ("prefix", "cold"),
                         ("prefix", "warm")}
    assert ttft[("prefix", "warm")] < 0.7 * ttft[("fp16", "none")], ttft


@pytest.mark.parametrize("questions", [["q one"], ["q one", "q two"]])  # a request; a batch on one prefix
def test_a_batch_stopped_at_its_first_token_keeps_its_prefix(questions, demo_image):
    """A server stops a batch whose clients have all gone (the per-token hook raises) at its first
    token; the prefix it prefilled is stored all the same, so a later request on it is a hit."""
    class Gone(Exception):
        pass

    def hook(tokens):
        raise Gone

    adapter = build_preset("tiny-llava", None, CPU, torch.float32, seed=0)
    policy = PrefixKVPolicy(64)
    engine = HFEngine(adapter, policy)
    engine.token_hook = hook
    with pytest.raises(Gone):
        engine.run_batch([(demo_image, q) for q in questions], 4)
    engine.token_hook = None
    assert len(policy.lru) == 1
    warm = engine.run(demo_image, "q three", 4)
    assert warm.cache_hit and warm.tokens == HFEngine(adapter, CachePolicy()).run(demo_image, "q three", 4).tokens

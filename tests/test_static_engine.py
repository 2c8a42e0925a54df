"""The static-cache decode loop the graph engine replays: same greedy tokens as generate, with and
without prefix reuse; the graph engine itself is a skipped row on a CPU."""
import csv

import pytest
import torch

from bench.engines.cache_policy import CachePolicy
from bench.cli import run_main
from bench.run.config import RunConfig
from bench.errors import UsageError
from bench.models.loader import load_checkpoint
from bench.engines.static import StaticEngine
from tests.test_engine import reference_generate
from variants.prefix import PrefixKVPolicy

CPU = torch.device("cpu")
N = 32


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_static_cache_tokens_equal_generate(family, checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    engine = StaticEngine(adapter, CachePolicy())
    for q in ("What is shown?", "Describe the colors in this picture, please."):
        assert engine.run(demo_image, q, N).tokens == reference_generate(adapter, demo_image, q, N)
    buffers = engine.cache  # one preallocated cache, reused by every request
    engine.run(demo_image, "again", N)
    assert engine.cache is buffers


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_static_cache_with_prefix_reuse(family, checkpoint_dirs, demo_image, monkeypatch):
    """Warm requests enter as suffix token ids (the path GraphEngine captures); a shorter suffix
    after a longer one in the same bucket is unaffected by what the longer one left staged."""
    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    engine = StaticEngine(adapter, PrefixKVPolicy(64))
    by_ids = []
    suffix_token = StaticEngine.suffix_token
    monkeypatch.setattr(StaticEngine, "suffix_token",
                        lambda self, ids, start, bucket: by_ids.append(len(ids[0])) or suffix_token(self, ids, start, bucket))
    assert not engine.run(demo_image, "warm-up question", N).cache_hit
    long_q = "Describe the colors in this picture, please, and say which one covers the most area."
    words = long_q.split()
    suffix_len = lambda q: len(adapter.prepare_text(q).suffix_ids)  # noqa: E731
    shorter = [" ".join(words[:i]) for i in range(1, len(words))]
    short_q = next(q for q in shorter if engine.bucket(suffix_len(q)) == engine.bucket(suffix_len(long_q)))
    for q in (long_q, short_q):
        r = engine.run(demo_image, q, N)
        assert r.cache_hit and r.cached_tokens == r.prefix_tokens
        assert r.tokens == reference_generate(adapter, demo_image, q, N)
    assert len(by_ids) == 2 and by_ids[0] > by_ids[1] and engine.bucket(by_ids[0]) == engine.bucket(by_ids[1])


def test_static_cache_grows_for_a_longer_request(checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs["vila"], None, CPU, torch.float32)
    engine = StaticEngine(adapter, CachePolicy())
    engine.run(demo_image, "short", 4)
    small = engine.max_len
    r = engine.run(demo_image, "long " * 100, 200)
    assert engine.max_len > small and engine.max_len >= r.prompt_tokens + 200
    assert r.tokens == reference_generate(adapter, demo_image, "long " * 100, 200)


def test_graph_engine_is_skipped_on_cpu_with_reason(tmp_path):
    out = tmp_path / "o"
    assert run_main(["--preset", "tiny-vila", "--variants", "fp16,prefix", "--engine", "hf,graph,graph-exact",
                     "--num-runs", "2",
                     "--min-seconds", "0", "--max-new-tokens", "4", "--warmup", "0", "--device", "cpu",
                     "--output-dir", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    graph = [r for r in rows if r["engine"] in ("graph", "graph-exact")]
    assert {r["variant"] for r in graph} == {"fp16+graph", "prefix+graph", "fp16+graph-exact", "prefix+graph-exact"}
    assert all(r["status"] == "skipped" and "CUDA" in r["error"] for r in graph)
    assert {r["variant"] for r in rows if r["status"] == "ok"} == {"fp16", "prefix"}


def test_engine_flag_crosses_variants():
    cfg = RunConfig(variants="fp16,bnb4+static", engine="hf,graph")
    assert cfg.variant_specs == ["fp16", "fp16+graph", "bnb4+static"]
    with pytest.raises(UsageError, match="unknown --engine 'turbo'"):
        RunConfig(variants="fp16", engine="turbo").variant_specs


def test_a_resident_prefix_is_reused_in_place_and_forgotten_when_overwritten(checkpoint_dirs, demo_image,
                                                                              monkeypatch):
    """A warm request whose prefix the working buffers still hold copies nothing; after another
    prompt overwrote them, the next hit copies the stored prefix back (checked on the buffers)."""
    from PIL import ImageOps

    from bench.engines.kv_buffers import KVBuffers
    from bench.models.visual import as_visual

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    policy = PrefixKVPolicy(64)
    engine = StaticEngine(adapter, policy)
    in_place_seen = []
    load = KVBuffers.load_prefixes

    def recording(self, entries, in_place=None):
        in_place_seen.append(list(in_place or [False] * len(entries)))
        return load(self, entries, in_place)

    monkeypatch.setattr(KVBuffers, "load_prefixes", recording)
    other = ImageOps.mirror(demo_image)
    engine.run(demo_image, "warm-up question", N)  # miss: stores the prefix the row now holds
    r = engine.run(demo_image, "What is shown?", N)
    assert r.cache_hit and in_place_seen == [[True]]
    assert r.tokens == reference_generate(adapter, demo_image, "What is shown?", N)
    engine.run(other, "What is shown?", N)  # another image's prompt overwrites the row
    q = "Describe the colors in this picture, please."
    r = engine.run(demo_image, q, N)
    assert r.cache_hit and in_place_seen[-1] == [False]
    assert r.tokens == reference_generate(adapter, demo_image, q, N)
    visual = as_visual(demo_image)
    entry = policy.lookup_prefix(adapter, adapter.prepare_text(q, visual), visual).entry
    assert torch.equal(engine.cache.data[..., :entry.shape[-2], :], entry)
    engine.teacher_forced_logprobs(demo_image, q, r.tokens[:4])  # a full prefill from column 0
    engine.run(demo_image, q, 4)
    assert in_place_seen[-1] == [False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_warm_requests_equal_generate(checkpoint_dirs, demo_image):
    """On the graph engine a warm request is one captured graph from suffix ids to first token
    (compiled layers, the matmul attention for the bucket's queries): greedy tokens as generate's,
    and so are a batch's asking one question about one image, cold (its prefix prefilled once, by
    a graph on a one-row buffer) and warm."""
    from PIL import ImageOps

    from bench.engines.graph import GraphEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, torch.device("cuda"), torch.float32)
    engine = GraphEngine(adapter, PrefixKVPolicy(64))
    assert not engine.run(demo_image, "warm-up question", N).cache_hit
    for q in ("Describe the colors in this picture, please.", "Why?", "What is shown?"):
        r = engine.run(demo_image, q, N)
        assert r.cache_hit and r.tokens == reference_generate(adapter, demo_image, q, N), q
    assert any(key[0] == "suffix ids" for key in engine.lm_graphs)
    q = "Why?"  # a batch asking one question about one image: one replay for every row
    other = ImageOps.mirror(demo_image)  # not stored: the batch's shared prefix is prefilled once
    cold = engine.run_batch([(other, q)] * 3, N)
    assert not cold.cache_hit and cold.batch_tokens == [reference_generate(adapter, other, q, N)] * 3
    assert any(key[0] == "scratch prefill" for key in engine.lm_graphs)
    warm = engine.run_batch([(demo_image, q)] * 3, N)  # stored by the single requests above
    assert warm.cache_hit and warm.batch_tokens == [reference_generate(adapter, demo_image, q, N)] * 3
    assert any(key[0] == "suffix ids" and key[3] == 3 for key in engine.lm_graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_cold_requests_replay_a_captured_prefill(checkpoint_dirs, demo_image):
    """A cold single request's prefill is one replay of the compiled prefill captured per
    64-token length bucket (padded after the prompt): greedy tokens as generate's, for prompts
    in one bucket and in another."""
    from bench.engines.graph import GraphEngine
    from bench.engines.spec import PREFILL_ROUND

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, torch.device("cuda"), torch.float32)
    engine = GraphEngine(adapter, CachePolicy())
    lengths = []
    for q in ("Describe the colors " * 30, "What is shown?", "Why?"):  # the longest first: no regrowth
        r = engine.run(demo_image, q, N)
        lengths.append(r.prompt_tokens)
        assert r.tokens == reference_generate(adapter, demo_image, q, N), q
    buckets = {key[1] for key in engine.lm_graphs if key[0] == "prefill"}
    assert buckets == {-(-n // PREFILL_ROUND) * PREFILL_ROUND for n in lengths} and len(buckets) >= 2
    assert "prefill graph" not in engine.notes and "CUDA-graphed per" in engine.describe()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_cold_batch_replays_a_captured_batch_prefill(checkpoint_dirs, demo_image):
    """A cold batch of prompts of unequal length without a prefix cache is one replay of the
    compiled prefill captured at the batch's shape (laid out at a 64-token bucket): every row's
    greedy tokens as generate's alone, for this batch and for another in the same bucket."""
    from PIL import ImageOps

    from bench.engines.graph import GraphEngine

    adapter = load_checkpoint(checkpoint_dirs["llava"], None, torch.device("cuda"), torch.float32)
    engine = GraphEngine(adapter, CachePolicy())
    other = ImageOps.mirror(demo_image)
    for batch in ([(demo_image, "What is shown?"), (other, "Describe the colors in this picture, please."),
                   (demo_image, "Why?")],
                  [(other, "Why?"), (demo_image, "Describe the colors, please."), (other, "What is shown?")]):
        r = engine.run_batch(batch, N)
        assert r.batch_tokens == [reference_generate(adapter, v, q, N) for v, q in batch]
    assert len([key for key in engine.lm_graphs if key[0] == "batch prefill"]) == 1
    assert "batch prefill graph" not in engine.notes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_captured_prefill_takes_the_int4_prefetch_into_its_graph(demo_image, monkeypatch):
    """With int4 weights the side stream that dequantizes a layer ahead is forked and joined
    inside the captured prefill: its replay gives the uncaptured prefill's logits."""
    import dataclasses

    from bench.models import presets
    from bench.models.loader import build_preset
    from bench.quant.awq import Int4Options, quantize_model
    from bench.engines.graph import GraphEngine
    from bench.engines.spec import PREFILL_ROUND

    # tiny-llava with an LLM the CUDA int4 kernel takes (in_features a multiple of 128)
    small = dataclasses.replace(presets.PRESETS["tiny-llava"], name="small-llava",
                                llm=dataclasses.replace(presets.PRESETS["tiny-llava"].llm, hidden=256, mlp=512))
    monkeypatch.setitem(presets.PRESETS, "small-llava", small)
    adapter = build_preset("small-llava", None, torch.device("cuda"), torch.float16)
    quantize_model(adapter, Int4Options(method="rtn", group_size=32))
    engine = GraphEngine(adapter, CachePolicy())
    assert engine.prefetch is not None
    p = adapter.prepare(demo_image, "What is shown in this picture?")
    with torch.inference_mode():
        embeds = adapter.prompt_embeds(p, adapter.encode_image(adapter.pixels_to_device(p)))
        n = embeds.shape[1]
        cache = engine.new_cache(n, 4)
        got = engine.prefill(embeds, cache, 0).clone()
        got_again = engine.prefill(embeds, cache, 0).clone()  # a second replay: slots refilled
        assert ("prefill", -(-n // PREFILL_ROUND) * PREFILL_ROUND) in engine.lm_graphs
        assert "prefill graph" not in engine.notes
        padded = torch.nn.functional.pad(embeds, (0, 0, 0, -(-n // PREFILL_ROUND) * PREFILL_ROUND - n))
        cache.reset()
        want = engine.full_prefill(padded, cache, 0, engine.prefill_fn, n_real=torch.tensor(n, device="cuda"))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got, got_again)
    # a batch's whole prefill too: its graph forks and joins the side stream as well
    from bench.engines.hf import layout_rows

    with torch.inference_mode():
        short = adapter.prompt_embeds(q := adapter.prepare(demo_image, "Why?"),
                                      adapter.encode_image(adapter.pixels_to_device(q)))
        cache = engine.new_cache(n, 4, 2)
        width = engine.batch_prompt_columns(n, cache, 4)
        rows, valid = layout_rows([embeds, short], [p.prefix_tokens, q.prefix_tokens], width)
        got = engine.prefill(rows, cache, 0, valid).clone()
        assert ("batch prefill", 2, width) in engine.lm_graphs and "batch prefill graph" not in engine.notes
        cache.reset()
        got_again = engine.prefill(rows, cache, 0, valid).clone()  # a second replay: slots refilled
        cache.reset()
        want = engine.full_prefill(rows, cache, 0, engine.prefill_fn, valid)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(got, got_again)


@pytest.mark.parametrize("engine_cls", ["hf", "static", "exact"])
def test_attention_of_few_queries_runs_without_cudnn(engine_cls, checkpoint_dirs, demo_image, monkeypatch):
    """Under the default deterministic attention kernels every SDPA call of fewer than
    FEW_QUERIES queries (decode steps, hf's short suffix after a prefix hit) sees cuDNN attention
    switched off, and longer calls (prompt, vision tower) see torch's own setting; the engines
    restore it after each call."""
    import torch.nn.functional as F

    from bench.engines import attention_kernels
    from bench.engines.hf import HFEngine

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        seen.append((q.shape[-2], torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        adapter = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
        from bench.engines.static_exact import StaticExactEngine

        engine = {"hf": HFEngine, "static": StaticEngine, "exact": StaticExactEngine}[engine_cls](adapter,
                                                                                              PrefixKVPolicy(64))
        engine.run(demo_image, "What is shown?", 4)
        engine.run(demo_image, "Colors?", 4)  # a prefix hit: a short suffix, then decode
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    few = {q for q, cudnn in seen if q < attention_kernels.FEW_QUERIES}
    assert 1 in few, seen  # decode steps were seen
    if engine_cls != "static":  # and the short suffix (the static engine pads it to a 16-query bucket)
        assert any(1 < q for q in few), seen
    assert all(cudnn == (q >= attention_kernels.FEW_QUERIES) for q, cudnn in seen), seen

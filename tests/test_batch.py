"""Batched requests: every row's greedy tokens equal the same request run alone, on both engine
kinds, with prompts of unequal length (questions and, for InternVL, tile counts), cold and with
prefixes restored from the cache."""
import pytest
import torch
from PIL import Image

from bench.engines.cache_policy import CachePolicy
from bench.engines.hf import HFEngine, layout_rows
from bench.models.loader import load_checkpoint
from bench.engines.static import StaticEngine
from variants.prefix import ImageEmbedPolicy, PrefixKVPolicy

CPU = torch.device("cpu")
N = 12
QUESTIONS = ["What is shown?", "Describe every colour you can see in this picture in detail.", "Why?"]


def alone(adapter, requests):
    engine = HFEngine(adapter, CachePolicy())
    return [engine.run(v, q, N).tokens for v, q in requests]


def test_layout_puts_gaps_between_prefix_and_rest():
    rows = [torch.arange(5.0).view(1, 5, 1), torch.arange(3.0).view(1, 3, 1) + 10]
    embeds, valid = layout_rows(rows, [2, 1])
    assert embeds[:, :, 0].tolist() == [[0, 1, 2, 3, 4], [10, 0, 0, 11, 12]]
    assert valid.tolist() == [[True] * 5, [True, False, False, True, True]]
    assert layout_rows(rows[:1], [2])[1] is None


@pytest.mark.parametrize("engine_cls", [HFEngine, StaticEngine])
@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_batched_greedy_equals_unbatched(family, engine_cls, checkpoint_dirs, demo_image):
    a = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    small = demo_image.resize((56, 56))  # InternVL: 1 tile vs 13 for the demo image
    requests = [(demo_image, QUESTIONS[0]), (small, QUESTIONS[1]), (demo_image, QUESTIONS[2])]
    want = alone(a, requests)
    r = engine_cls(a, CachePolicy()).run_batch(requests, N)
    assert r.batch_size == 3 and r.batch_tokens == want
    assert r.tokens == want[0] and len(r.step_ms) == N - 1
    if family == "internvl":
        assert r.prompt_tokens > min(a.prepare_text(q, v).prompt_tokens for v, q in requests)  # padded


@pytest.mark.parametrize("engine_cls", [HFEngine, StaticEngine])
def test_batched_prefix_reuse_equals_unbatched(engine_cls, checkpoint_dirs, demo_image):
    a = load_checkpoint(checkpoint_dirs["internvl"], None, CPU, torch.float32)
    other = demo_image.resize((56, 56))
    engine = engine_cls(a, PrefixKVPolicy(64))
    cold = engine.run_batch([(demo_image, "warm-up one"), (other, "warm-up two")], 2)
    assert not cold.cache_hit
    requests = [(demo_image, QUESTIONS[0]), (other, QUESTIONS[1]), (demo_image, QUESTIONS[2])]
    warm = engine.run_batch(requests, N)
    assert warm.cache_hit and warm.cached_tokens == warm.prefix_tokens
    assert warm.phases_ms.get("vision", 0.0) == 0.0
    assert warm.batch_tokens == alone(a, requests)
    # one row's prefix unknown: the batch runs cold for every row (and stores the new prefix)
    third = demo_image.rotate(90)
    mixed = engine.run_batch([(demo_image, QUESTIONS[0]), (third, QUESTIONS[0])], N)
    assert not mixed.cache_hit and mixed.batch_tokens == alone(a, [(demo_image, QUESTIONS[0]), (third, QUESTIONS[0])])
    assert engine.run(third, QUESTIONS[2], 2).cache_hit


def test_batched_image_embedding_cache(checkpoint_dirs, demo_image):
    a = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    engine = HFEngine(a, ImageEmbedPolicy(64))
    flipped = demo_image.transpose(Image.FLIP_LEFT_RIGHT)
    requests = [(demo_image, QUESTIONS[0]), (flipped, QUESTIONS[1])]
    assert not engine.run_batch(requests, 2).cache_hit
    r = engine.run_batch(requests, N)
    assert r.cache_hit and r.batch_tokens == alone(a, requests)


@pytest.mark.parametrize("engine_cls", [HFEngine, StaticEngine])
def test_padded_rows_give_their_unbatched_logits(engine_cls, checkpoint_dirs, demo_image):
    """Logit-level (greedy tokens of a tiny random model hardly move with positions): prefill and
    two decode steps of a padded batch equal each row alone."""
    a = load_checkpoint(checkpoint_dirs["vila"], None, CPU, torch.float32)
    engine = engine_cls(a, CachePolicy())
    prepared = [a.prepare(demo_image, q) for q in QUESTIONS]
    rows = [a.prompt_embeds(p, a.encode_image(p.pixel_values)) for p in prepared]

    def run(rows_, prefix):
        cache = engine.new_cache(max(r.shape[1] for r in rows_), 4, len(rows_))
        embeds, valid = layout_rows(rows_, prefix)
        out = [engine.prefill(embeds, cache, 0, valid)[:, -1]]
        tok = out[0].argmax(-1)
        for _ in range(2):
            out.append(engine.decode_step(tok, cache)[:, -1])
            tok = out[-1].argmax(-1)
        return torch.stack(out, 1)  # [B, 3, vocab]

    with torch.inference_mode():
        batched = run(rows, [p.prefix_tokens for p in prepared])
        for b, (r, p) in enumerate(zip(rows, prepared)):
            torch.testing.assert_close(batched[b], run([r], [p.prefix_tokens])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine_cls", [HFEngine, StaticEngine])
def test_cold_batch_on_one_image_prefills_the_prefix_once(engine_cls, checkpoint_dirs, demo_image, monkeypatch):
    a = load_checkpoint(checkpoint_dirs["internvl"], None, CPU, torch.float32)
    requests = [(demo_image, q) for q in QUESTIONS]
    want = alone(a, requests)
    engine = engine_cls(a, PrefixKVPolicy(64))
    calls = {"vision_images": 0, "prefill_rows": []}
    encode, prefill = engine.encode_image, engine.prefill
    monkeypatch.setattr(engine, "encode_image", lambda px: calls.__setitem__("vision_images", px.shape[0]) or encode(px))
    monkeypatch.setattr(engine, "prefill", lambda e, c, s, v=None: calls["prefill_rows"].append((e.shape[0], s))
                        or prefill(e, c, s, v))
    cold = engine.run_batch(requests, N)
    assert not cold.cache_hit and cold.batch_tokens == want
    prefix = cold.prefix_tokens
    assert calls["vision_images"] == 13  # one image's tiles, not three
    assert calls["prefill_rows"] == [(1, 0), (3, prefix)]  # the prefix once, then the three suffixes
    assert len(engine.policy.lru) == 1 and engine.run(demo_image, "Another question?", 2).cache_hit


def test_a_batch_asking_one_question_about_one_image_enters_as_suffix_ids(checkpoint_dirs, demo_image, monkeypatch):
    """Rows whose prefixes share one length and whose suffixes share another (the benchmark's
    batches: one image, one question) go in as suffix token ids together (the path GraphEngine
    replays as one graph), cold after the prefix is prefilled once and warm; each row's tokens
    equal the request alone. Suffixes of unequal length take the embeddings path."""
    a = load_checkpoint(checkpoint_dirs["llava"], None, CPU, torch.float32)
    engine = StaticEngine(a, PrefixKVPolicy(64))
    rows = []
    suffix_token = StaticEngine.suffix_token
    monkeypatch.setattr(StaticEngine, "suffix_token",
                        lambda self, ids, start, bucket: rows.append(len(ids)) or suffix_token(self, ids, start, bucket))
    requests = [(demo_image, QUESTIONS[1])] * 3
    want = alone(a, requests[:1]) * 3
    cold = engine.run_batch(requests, N)
    assert not cold.cache_hit and cold.batch_tokens == want and rows == [3]
    warm = engine.run_batch(requests, N)
    assert warm.cache_hit and warm.batch_tokens == want and rows == [3, 3]
    assert engine.run(demo_image, QUESTIONS[1], N).tokens == want[0] and rows == [3, 3, 1]
    mixed = [(demo_image, QUESTIONS[0]), (demo_image, QUESTIONS[1])]
    assert engine.run_batch(mixed, N).batch_tokens == alone(a, mixed) and rows == [3, 3, 1]

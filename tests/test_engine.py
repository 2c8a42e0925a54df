"""The hf engine is the greedy loop generate runs: same tokens, fixed length, tiled phases."""
import pytest
import torch

from bench.engines.cache_policy import CachePolicy
from bench.engines.hf import HFEngine
from bench.measure.metrics import phases_total_ms, request_metrics
from bench.models.loader import load_checkpoint

CPU = torch.device("cpu")
N = 24


def native_ids(adapter, p) -> list[int]:
    """The prompt as the model's own processor writes it: one placeholder id per image token."""
    ids = list(p.text_segments[0])
    for n, seg in zip(p.image_tokens, p.text_segments[1:]):
        ids += [adapter.image_token_id] * n + seg
    return ids + p.suffix_ids


def reference_generate(adapter, image, question, n):
    """transformers' own generate on the same prompt (greedy, fixed length)."""
    p = adapter.prepare(image, question)
    with torch.no_grad():
        if adapter.family in ("llava", "internvl"):  # native classes: ids with image placeholders + pixels
            ids = native_ids(adapter, p)
            out = adapter.model.generate(input_ids=torch.tensor([ids]), pixel_values=p.pixel_values,
                                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, len(ids):].tolist()
        img = adapter.encode_image(adapter.pixels_to_device(p))
        emb = adapter.prompt_embeds(p, img)
        out = adapter.model.llm.generate(inputs_embeds=emb, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0].tolist()


@pytest.mark.parametrize("family", ["llava", "vila", "internvl"])
def test_engine_tokens_equal_generate(family, checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs[family], None, CPU, torch.float32)
    engine = HFEngine(adapter, CachePolicy())
    result = engine.run(demo_image, "What is shown?", N)
    assert len(result.tokens) == N
    assert result.tokens == reference_generate(adapter, demo_image, "What is shown?", N)
    assert len(result.step_ms) == N - 1
    assert not result.cache_hit and result.cached_tokens == 0


def test_phases_add_up_to_e2e(checkpoint_dirs, demo_image):
    adapter = load_checkpoint(checkpoint_dirs["vila"], None, CPU, torch.float32)
    engine = HFEngine(adapter, CachePolicy())
    gaps = []
    for q in ("a", "What colors dominate the scene?", "a"):
        r = engine.run(demo_image, q, 16)
        row = request_metrics(r, 16)
        # never counted twice; the untimed host code between phases is short, except where a
        # preemption on a busy machine lengthens it in one request (so the least of three)
        assert phases_total_ms(row) <= 1.02 * row["e2e_ms"]
        gaps.append((row["e2e_ms"] - phases_total_ms(row)) / row["e2e_ms"])
        assert row["ttft_ms"] == pytest.approx(row["preprocess_ms"] + row["lookup_ms"] + row["restore_ms"] + row["vision_ms"]
                                               + row["prefill_ms"])
        assert row["tpot_ms"] == pytest.approx((row["e2e_ms"] - row["ttft_ms"]) / 15)
        assert row["decode_tok_s"] == pytest.approx(15 / (row["decode_ms"] / 1e3))
    assert min(gaps) <= 0.02, gaps  # a phase left untimed would be missing from every request


def test_timeline_phases_tile():
    from bench.measure.timing import Timeline

    tl = Timeline(CPU)
    tl.mark("start", host_only=True)
    for label in ("a", "b", "b", "c"):
        sum(range(20000))
        tl.mark(label)
    phases = tl.phases_ms()
    assert [p[0] for p in phases] == ["a", "b", "b", "c"]
    assert all(ms > 0 for _, ms in phases)
    assert sum(ms for _, ms in phases) <= tl.span_ms()
    assert tl.phases_ms() == phases  # read once, kept


def test_phases_on_one_clock_count_a_hidden_host_phase_once():
    """A batch's cache filled on the GPU (restore, 3 ms) while the host preprocesses its images
    (12 ms from the restore mark): the overlap counts once, in the GPU phase, and the phases add
    up to the span (on two clocks they added up to 15 ms + the rest, 3 ms over the wall time)."""
    from bench.measure.timing import tile

    marks = [("preprocess", 1.0, None),  # host-only: prompts tokenized, 1 ms
             ("restore", 1.01, 4.0),  # queued by 1.01 ms on the host, done on the GPU at 4 ms
             ("preprocess", 13.01, None),  # images: host 1.01 -> 13.01 ms, under the restore's GPU work until 4
             ("vision", 13.2, 20.0), ("prefill", 13.5, 30.0)]
    phases = tile(marks)
    assert [label for label, _ in phases] == [m[0] for m in marks]
    assert [round(ms, 6) for _, ms in phases] == [1.0, 3.0, 9.01, 6.99, 10.0]
    assert sum(ms for _, ms in phases) == pytest.approx(30.0)
    # wholly hidden: a host phase that ended before the GPU finished the phase before it is 0
    assert tile([("restore", 0.1, 5.0), ("preprocess", 3.0, None), ("vision", 3.1, 8.0)]) == \
        [("restore", 5.0), ("preprocess", 0.0), ("vision", 3.0)]
    # GPU marks alone: the events' own differences
    assert tile([("a", 0.1, 2.0), ("b", 0.2, 2.5), ("c", 0.3, 7.5)]) == [("a", 2.0), ("b", 0.5), ("c", 5.0)]
    # the host clock alone (CPU): the host's differences
    assert tile([("a", 2.0, None), ("b", 2.5, None)]) == [("a", 2.0), ("b", 0.5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timelines_reuse_their_events_and_time_each_phase():
    from bench.measure.timing import Timeline

    x = torch.randn(2048, 2048, device="cuda")
    x = (x @ x).tanh()  # cuBLAS set up before anything is timed
    torch.cuda.synchronize()
    measured = []
    for work in (1, 8, 1):  # the second timeline reuses the first one's events
        tl = Timeline(torch.device("cuda"))
        tl.mark("start", host_only=True)
        for _ in range(work):
            x = (x @ x).tanh()
        tl.mark("gpu")
        tl.mark("idle")
        measured.append(dict(tl.phases_ms()))
    assert measured[1]["gpu"] > 3 * measured[0]["gpu"] and measured[1]["gpu"] > 3 * measured[2]["gpu"]
    assert all(m["idle"] < m["gpu"] for m in measured)


def test_a_token_feed_hands_every_step_to_the_hook_in_order():
    """On the CPU each step's ids go to the hook at once; on CUDA one step late (after the next
    step is queued), all of them by the flush, in order."""
    from bench.engines.token_feed import TokenFeed

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        seen = []
        feed = TokenFeed(seen.append)
        for step in range(5):
            tokens = torch.tensor([step, 10 + step], device=device)
            if device == "cuda":
                torch.cuda._sleep(1_000_000)  # a step still running when its ids are pushed
            feed.push(tokens * 1)
            assert len(seen) == (step + 1 if device == "cpu" else step)
        feed.flush()
        assert seen == [[s, 10 + s] for s in range(5)], device
        idle = TokenFeed(None)  # an engine with no hook: nothing is copied or handed over
        idle.push(torch.tensor([1], device=device))
        idle.flush()
        assert idle._pending is None and not idle._events

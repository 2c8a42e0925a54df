"""pytest-benchmark micro-benchmarks of the tiny presets: one prefill, one decode step.

Not part of the default test run. Keep a baseline and fail on a slowdown:
    python -m pytest -m perf tests/perf --benchmark-autosave
    python -m pytest -m perf tests/perf --benchmark-compare --benchmark-compare-fail=median:10%
"""
import pytest
import torch
from transformers import DynamicCache

from bench.models.loader import build_preset

pytestmark = pytest.mark.perf


@pytest.fixture(scope="module", params=["tiny-vila", "tiny-llava"])
def prompt(request, demo_image):
    adapter = build_preset(request.param, None, torch.device("cpu"), torch.float32)
    p = adapter.prepare(demo_image, "What is shown in this image?")
    with torch.inference_mode():
        img = adapter.encode_image(adapter.pixels_to_device(p))
        embeds = adapter.prompt_embeds(p, img)
    return adapter, embeds


def test_prefill(benchmark, prompt):
    adapter, embeds = prompt

    @torch.inference_mode()
    def prefill():
        return adapter.lm_forward(embeds, DynamicCache())

    benchmark(prefill)


def test_decode_step(benchmark, prompt):
    adapter, embeds = prompt
    with torch.inference_mode():
        cache = DynamicCache()
        logits = adapter.lm_forward(embeds, cache)
        token = logits[:, -1].argmax(-1)
        step_embeds = adapter.input_embeddings()(token[:, None])
    prompt_len = embeds.shape[1]

    @torch.inference_mode()
    def step():
        cache.crop(-(cache.get_seq_length() - prompt_len)) if cache.get_seq_length() > prompt_len else None
        return adapter.lm_forward(step_embeds, cache)

    benchmark(step)

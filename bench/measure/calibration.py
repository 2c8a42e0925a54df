"""A fixed host reference workload, measured next to each measured request (`--calibrate`,
CPU device).

Both are measured in process CPU time, not wall time: another program on the machine takes
wall time from a request but leaves its CPU time nearly alone (what is left, a core's shared
caches and execution units, slows the reference alike, measured within milliseconds of the
request: before and after it, as asv interleaves its rounds). Dividing by the reference
(ttft_rel, tpot_rel) also takes out the machine's speed. ci-bench gates on these. The workload
is what a small model's request is made of on the host, so that contention slows both alike: a
tiny Llama from transformers (not this project's code, so a regression here never cancels out)
prefilling and decoding with a DynamicCache, on the run's torch threads. (A 4-layer MLP loop
tracked load far worse: under a CPU burner requests' CPU time grew 20-40% more than its.)
"""
from __future__ import annotations

import functools
import inspect
import time

import torch

_STEPS = 16  # decode steps after a one-token prompt: about half a ci-bench request


@functools.lru_cache(maxsize=1)
def _reference():
    """A small Llama (transformers' own class, random weights from a fixed seed, the global RNG
    left as it was) and the name its forward gives the KV cache (`cache` from transformers 5.2x,
    `past_key_values` before)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    names = inspect.signature(LlamaForCausalLM.forward).parameters
    return model, "cache" if "cache" in names else "past_key_values"


@torch.inference_mode()
def reference_ms() -> float:
    """Process CPU time of one pass of the reference workload (one prompt token, then _STEPS
    greedy decode steps with a DynamicCache), ms."""
    from transformers import DynamicCache

    model, cache_arg = _reference()
    t0 = time.process_time()
    cache = DynamicCache()
    logits = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True, **{cache_arg: cache}).logits
    for _ in range(_STEPS):
        logits = model(input_ids=logits[:, -1:].argmax(-1), use_cache=True, **{cache_arg: cache}).logits
    return (time.process_time() - t0) * 1e3

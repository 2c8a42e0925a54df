"""Answer-quality cost of a variant, against the fp16 baseline on the same input.

- token_agree: share of the variant's greedy tokens equal, position by position, to the
  baseline's (first_divergence: where they first differ).
- kl_mean: mean KL(baseline || variant) of the next-token distributions, both teacher-forced
  on the baseline's continuation, so one early flip does not make every later position moot.
  The variant's side runs transformers' forward: it measures the weights.
- engine_kl_mean / engine_top1_agree: the same, but the variant's distributions come from its
  own engine's prefill and decode steps (for `graph`: the replayed CUDA graph), so they measure
  weights and engine together. With random weights near-tied top-2 logits are common, so a
  rounding-level engine difference flips greedy tokens (token_agree) at KL ~ 0.

Measured once per variant outside the timed runs, on a probe question that is never measured.
With random weights this is numeric fidelity only: the text means nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from bench.models.base import VLMAdapter
from bench.questions import FIDELITY_PROBE


@dataclass
class FidelityReference:
    question: str
    tokens: list[int]
    logprobs: torch.Tensor  # [new_tokens, vocab], float32, CPU


@torch.inference_mode()
def teacher_forced_logprobs(adapter: VLMAdapter, image, question: str, continuation: list[int]) -> torch.Tensor:
    """Log-probabilities the model gives each position of `continuation` after the prompt."""
    prepared = adapter.prepare(image, question)
    image_embeds = adapter.encode_image(adapter.pixels_to_device(prepared))
    embeds = adapter.prompt_embeds(prepared, image_embeds, continuation[:-1])
    logits = adapter.lm_forward(embeds, DynamicCache(), logits_to_keep=len(continuation))
    return torch.log_softmax(logits[0].float(), dim=-1).cpu()


def _greedy(engine, image, question: str, new_tokens: int) -> list[int]:
    # The first request of a fresh model can run other kernels than later ones (seen on the
    # H200: a fresh fp16 model's first greedy run agreed with its next runs on 69% of tokens,
    # while teacher-forced log-probs matched exactly). Warm once, then take the tokens.
    engine.run(image, question, new_tokens)
    return engine.run(image, question, new_tokens).tokens


def make_reference(engine, image, new_tokens: int, question: str = FIDELITY_PROBE) -> FidelityReference:
    tokens = _greedy(engine, image, question, new_tokens)
    return FidelityReference(question, tokens, teacher_forced_logprobs(engine.adapter, image, question, tokens))


def kl_mean(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    return float(kl.clamp_min(0).mean())


def compare(ref: FidelityReference, engine, image) -> dict:
    tokens = _greedy(engine, image, ref.question, len(ref.tokens))
    logprobs = teacher_forced_logprobs(engine.adapter, image, ref.question, ref.tokens)
    engine_logprobs = engine.teacher_forced_logprobs(image, ref.question, ref.tokens)
    pairs = list(zip(tokens, ref.tokens))
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    return {
        "token_agree": sum(a == b for a, b in pairs) / len(ref.tokens),
        "first_divergence": first,
        "kl_mean": kl_mean(ref.logprobs, logprobs),
        "engine_kl_mean": kl_mean(ref.logprobs, engine_logprobs),
        "engine_top1_agree": float((engine_logprobs.argmax(-1) == ref.logprobs.argmax(-1)).float().mean()),
        "fidelity_probe": ref.question,
    }

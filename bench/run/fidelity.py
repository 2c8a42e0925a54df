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
- divergence_margin / divergence_margin_steps: how close the call was where the variant first
  diverged: the baseline's log-prob margin of its own token over the variant's there, in nats
  and in rounding steps of the logits' dtype at the baseline's top logit (0-1 steps: tied or
  adjacent values, a rounding flip; many steps: the variant changed the answer).
- ref_near_tie_share: share of the baseline's positions whose top-2 logits lie within one such
  step: greedy decoding there flips under any change of kernels, so an engine that is not
  bit-identical to the baseline diverges after about 1 / share tokens whatever its accuracy.

Measured once per variant outside the timed runs, on a probe question that is never measured.
With random weights this is numeric fidelity only: the text means nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from bench.models.base import VLMAdapter
from bench.models.prompts import FIDELITY_PROBE
from bench.quant.awq import int4_layers
from bench.quant.w4a16.choice import default_kernels


@dataclass
class FidelityReference:
    question: str
    tokens: list[int]
    logprobs: torch.Tensor  # [new_tokens, vocab], float32, CPU
    step: torch.Tensor  # [new_tokens]: rounding step of the logits' dtype at each position's top logit


@torch.inference_mode()
def teacher_forced_logits(adapter: VLMAdapter, image, question: str, continuation: list[int]) -> torch.Tensor:
    """The logits (model dtype, CPU) the model gives each position of `continuation` after the
    prompt: its weights alone, so int4 linears run the default kernels whatever kernels an engine
    over the model chose (--int4-kernels, --int4-prefill-kernel: engine_kl_mean measures those)."""
    with default_kernels(int4_layers(adapter)):
        prepared = adapter.prepare(image, question)
        image_embeds = adapter.encode_image(adapter.pixels_to_device(prepared))
        embeds = adapter.prompt_embeds(prepared, image_embeds, continuation[:-1])
        return adapter.lm_forward(embeds, DynamicCache(), logits_to_keep=len(continuation))[0].cpu()


def teacher_forced_logprobs(adapter: VLMAdapter, image, question: str, continuation: list[int]) -> torch.Tensor:
    """Log-probabilities the model gives each position of `continuation` after the prompt."""
    return torch.log_softmax(teacher_forced_logits(adapter, image, question, continuation).float(), dim=-1)


def rounding_step(values: torch.Tensor) -> torch.Tensor:
    """Spacing of representable numbers of `values`' dtype at each value (one ulp), float32."""
    finfo = torch.finfo(values.dtype)
    exponent = torch.floor(torch.log2(values.float().abs().clamp_min(finfo.tiny)))
    return finfo.eps * torch.exp2(exponent)


def _greedy(engine, image, question: str, new_tokens: int) -> list[int]:
    # The first request of a fresh model can run other kernels than later ones (seen on the
    # H200: a fresh fp16 model's first greedy run agreed with its next runs on 69% of tokens,
    # while teacher-forced log-probs matched exactly). Warm once, then take the tokens.
    engine.run(image, question, new_tokens)
    return engine.run(image, question, new_tokens).tokens


def make_reference(engine, image, new_tokens: int, question: str = FIDELITY_PROBE) -> FidelityReference:
    tokens = _greedy(engine, image, question, new_tokens)
    logits = teacher_forced_logits(engine.adapter, image, question, tokens)
    return FidelityReference(question, tokens, torch.log_softmax(logits.float(), dim=-1),
                             rounding_step(logits.max(-1).values))


def near_tie_share(ref: FidelityReference) -> float:
    """Share of the reference's positions whose top-2 logits are within one rounding step."""
    top2 = ref.logprobs.topk(2, dim=-1).values
    return float(((top2[:, 0] - top2[:, 1]) <= ref.step).float().mean())


def token_agree(tokens: list[int], ref_tokens: list[int]) -> float:
    """Share of the reference's tokens that `tokens` equals, position by position."""
    return sum(a == b for a, b in zip(tokens, ref_tokens)) / len(ref_tokens)


def first_divergence(tokens: list[int], other: list[int]) -> int | None:
    """The first position where two token lists differ (None: they agree throughout)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), None)


def divergence(ref: FidelityReference, tokens: list[int]) -> dict:
    """first_divergence and the reference's margin there (nats, rounding steps); None if none differ."""
    first = first_divergence(tokens, ref.tokens)
    if first is None:
        return {"first_divergence": None, "divergence_margin": None, "divergence_margin_steps": None}
    margin = float(ref.logprobs[first, ref.tokens[first]] - ref.logprobs[first, tokens[first]])
    return {"first_divergence": first, "divergence_margin": margin,
            "divergence_margin_steps": margin / float(ref.step[first])}


def agreement(ref: FidelityReference, tokens: list[int]) -> dict:
    """token_agree, the first divergence and its margin, and the reference's near-tie share."""
    return {"token_agree": token_agree(tokens, ref.tokens),
            **divergence(ref, tokens), "ref_near_tie_share": near_tie_share(ref)}


def kl_mean(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    return float(kl.clamp_min(0).mean())


def compare(ref: FidelityReference, engine, image) -> dict:
    tokens = _greedy(engine, image, ref.question, len(ref.tokens))
    logprobs = teacher_forced_logprobs(engine.adapter, image, ref.question, ref.tokens)
    engine_logprobs = engine.teacher_forced_logprobs(image, ref.question, ref.tokens)
    return {
        **agreement(ref, tokens),
        "kl_mean": kl_mean(ref.logprobs, logprobs),
        "engine_kl_mean": kl_mean(ref.logprobs, engine_logprobs),
        "engine_top1_agree": float((engine_logprobs.argmax(-1) == ref.logprobs.argmax(-1)).float().mean()),
        "fidelity_probe": ref.question,
    }

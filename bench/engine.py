"""The `hf` engine: transformers' eager forward with a DynamicCache, greedy, fixed length.

It is the loop `generate` runs for greedy search, written out so each phase is timed:
tokenize (CPU) -> prefix lookup -> restore -> [miss: image processor (CPU) -> vision] ->
prefill (first token on host) -> [miss: cache store] -> one timed step per further token.
EOS is ignored: every request decodes exactly `max_new_tokens` tokens, so runs are comparable.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from bench.cache_policy import CachePolicy
from bench.models.base import VLMAdapter
from bench.timing import Timeline, sum_by_label
from bench.visual import as_visual


@dataclass
class RequestResult:
    tokens: list[int]
    phases_ms: dict[str, float]  # preprocess, lookup, restore, vision, prefill, store, decode (summed)
    step_ms: list[float]  # one entry per decode step (new_tokens - 1)
    e2e_ms: float
    prompt_tokens: int
    prefix_tokens: int
    cached_tokens: int
    cache_hit: bool
    extra: dict = field(default_factory=dict)


class HFEngine:
    name = "hf"

    def __init__(self, adapter: VLMAdapter, policy: CachePolicy):
        self.adapter, self.policy = adapter, policy

    def new_cache(self, prompt_tokens: int, max_new_tokens: int):
        """The request's working KV cache (a fresh DynamicCache; StaticEngine reuses one buffer)."""
        return DynamicCache()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector on device pixels (GraphEngine replays a captured graph)."""
        return self.adapter.encode_image(pixel_values)

    def prefill(self, embeds: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Forward `embeds` placed after the `start` tokens already in `cache`; last logits."""
        return self.adapter.lm_forward(embeds, cache)

    def describe(self) -> str:
        """How this engine runs (the engine_detail column)."""
        return "transformers forward, DynamicCache"

    def decode_step(self, token: torch.Tensor, cache) -> torch.Tensor:
        """One decode step on `token` (greedy decode and teacher forcing); logits [1, 1, vocab]."""
        return self.adapter.lm_forward(self.adapter.input_embeddings()(token[:, None]), cache)

    @torch.inference_mode()
    def teacher_forced_logprobs(self, visual, question: str, continuation: list[int]) -> torch.Tensor:
        """Log-probabilities of each position of `continuation`, computed the way this engine
        serves a request: its prefill, then one of its decode steps per token. [len, vocab] on CPU."""
        a = self.adapter
        prepared = a.prepare(visual, question)
        cache = self.new_cache(prepared.prompt_tokens, len(continuation))
        image_embeds = self.encode_image(a.pixels_to_device(prepared))
        rows = [self.prefill(a.prompt_embeds(prepared, image_embeds), cache, 0)[:, -1].float()]
        for tok in continuation[:-1]:
            rows.append(self.decode_step(torch.tensor([tok], device=a.device), cache)[:, -1].float())
        return torch.log_softmax(torch.cat(rows), dim=-1).cpu()

    def decode(self, token: torch.Tensor, cache, steps: int, tl: Timeline) -> list[torch.Tensor]:
        """`steps` greedy steps after `token`, one timeline mark each; token ids stay on device."""
        out = []
        for _ in range(steps):
            token = self.decode_step(token, cache)[:, -1].argmax(-1)
            out.append(token)
            tl.mark("decode")
        return out

    @torch.inference_mode()
    def run(self, visual, question: str, max_new_tokens: int) -> RequestResult:
        """One request: `visual` is a VisualInput, one PIL image or a list of them."""
        a, policy = self.adapter, self.policy
        tl = Timeline(a.device)
        t0 = time.perf_counter()
        tl.mark("start", host_only=True)
        visual = as_visual(visual)
        prepared = a.prepare_text(question, visual)
        tl.mark("preprocess", host_only=True)

        entry = policy.lookup_prefix(a, prepared, visual)
        tl.mark("lookup")
        cache = self.new_cache(prepared.prompt_tokens, max_new_tokens)
        hit = policy.restore_prefix(entry, cache) if entry is not None else None
        tl.mark("restore")
        embeds_hit = False
        if hit is None:
            prepared.pixel_values = a.preprocess(visual)
            tl.mark("preprocess", host_only=True)
            image_embeds, embeds_hit = policy.image_embeds(
                a, prepared, lambda: self.encode_image(a.pixels_to_device(prepared)))
            tl.mark("vision")
            logits = self.prefill(a.prompt_embeds(prepared, image_embeds), cache, 0)
            token = logits[:, -1].argmax(-1)
            first = int(token.item())
            tl.mark("prefill")
            policy.store_prefix(a, prepared, cache)
            tl.mark("store")
            cached = 0
        else:
            logits = self.prefill(a.embed_ids(prepared.suffix_ids), cache, hit.cached_tokens)
            token = logits[:, -1].argmax(-1)
            first = int(token.item())
            tl.mark("prefill")
            cached = hit.cached_tokens

        generated = self.decode(token, cache, max_new_tokens - 1, tl)
        tokens = [first] + (torch.cat(generated).tolist() if generated else [])
        e2e_ms = (time.perf_counter() - t0) * 1e3

        phases = tl.phases_ms()
        return RequestResult(
            tokens=tokens,
            phases_ms=sum_by_label(phases),
            step_ms=[ms for label, ms in phases if label == "decode"],
            e2e_ms=e2e_ms,
            prompt_tokens=prepared.prompt_tokens,
            prefix_tokens=prepared.prefix_tokens,
            cached_tokens=cached,
            cache_hit=hit is not None or embeds_hit,
            extra={"engine_detail": self.describe()},
        )

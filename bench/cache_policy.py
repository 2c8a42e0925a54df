"""How a request may reuse earlier work. The engine calls these hooks; variants supply them.

The default policy reuses nothing. A policy that keeps state (`stateful`) gets cold runs
(state cleared first) reported apart from warm ones by the runner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bench.models.base import PreparedPrompt, VLMAdapter
from bench.visual import VisualInput


@dataclass
class PrefixHit:
    cached_tokens: int  # the working cache now holds this many prefix tokens


class CachePolicy:
    name = "none"
    stateful = False

    def lookup_prefix(self, adapter: VLMAdapter, prepared: PreparedPrompt, visual: VisualInput) -> object | None:
        """The stored prefix for this request, or None on a miss. Called before the images are
        preprocessed: a hit skips the image processor, the vision tower and the prefix prefill."""
        return None

    def restore_prefix(self, entry: object, cache) -> PrefixHit:
        """Copy the looked-up prefix into the request's (empty) working cache."""
        raise NotImplementedError

    def image_embeds(self, adapter: VLMAdapter, prepared: PreparedPrompt,
                     compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """(image embeddings, whether they came from a cache)."""
        return compute(), False

    def store_prefix(self, adapter: VLMAdapter, prepared: PreparedPrompt, cache) -> None:
        """Called after a full prefill with the cache holding prefix + suffix."""

    def clear(self) -> None:
        """Forget everything (the next request is cold)."""

    def stats(self) -> dict:
        return {}

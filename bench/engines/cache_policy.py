"""How a request may reuse earlier work. The engine calls these hooks; variants supply them.

A policy is a keyed store and knows nothing of cache formats: the engine turns its KV cache
into an entry (`save_prefix`) and back (`restore_prefixes`), so a policy serves every engine.
The default policy reuses nothing. A policy that keeps state (`stateful`) gets cold runs
(state cleared first) reported apart from warm ones by the runner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bench.models.base import PreparedPrompt, VLMAdapter
from bench.models.visual import VisualInput


@dataclass
class PrefixLookup:
    key: tuple
    entry: object | None  # the stored prefix (engine format), None on a miss


class CachePolicy:
    name = "none"
    stateful = False

    def lookup_prefix(self, adapter: VLMAdapter, prepared: PreparedPrompt, visual: VisualInput) -> PrefixLookup | None:
        """The stored prefix for this request (None: this policy keeps no prefixes). Called before
        the images are preprocessed: a hit skips the image processor, the vision tower and the
        prefix prefill."""
        return None

    def store_prefix(self, lookup: PrefixLookup, entry: object, nbytes: int) -> None:
        """Keep `entry` (the prefix as the engine saved it) under the key a missed lookup made."""

    def image_embeds(self, adapter: VLMAdapter, prepared: list[PreparedPrompt],
                     compute: Callable[[list[int]], list[torch.Tensor]]) -> tuple[list[torch.Tensor], bool]:
        """(image embeddings of every request of a batch, whether any came from a cache);
        `compute(rows)` runs the vision tower once over those rows' pixels."""
        return compute(list(range(len(prepared)))), False

    def clear(self) -> None:
        """Forget everything (the next request is cold)."""

    def refusal(self) -> str | None:
        """Why an entry was not kept since the last clear(): larger than the whole budget (warm
        requests can then never hit); None when every entry was kept."""
        return None

    def stats(self) -> dict:
        return {}

"""Cache variants.

- prefix:     a real prefix KV cache. The keys/values of system prompt + image tokens are
              computed once; a later question on the same image and system prompt prefills
              only its own suffix (and skips the image processor and vision tower).
- embedcache: what the seed's VILA fork did: post-projector image embeddings cached by the
              SHA-256 of the preprocessed image; the LLM still prefills every prompt token.

Both work on whatever the weights variant loaded: they only see the adapter's embeddings and
the transformers Cache, never how weights are stored.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.engines.cache_policy import CachePolicy, PrefixLookup
from bench.engines.lru import ByteLRU
from bench.models.base import image_content_digest
from bench.errors import UsageError
from variants.base import CachePart
from variants.options import opt


@dataclass(frozen=True)
class CacheOptions:
    prefix_cache_mb: float = opt("byte budget of the prefix / image-embedding caches, MiB", 4096.0)

    def __post_init__(self):
        import math

        if not (math.isfinite(self.prefix_cache_mb) and self.prefix_cache_mb > 0):
            raise UsageError(f"--prefix-cache-mb must be a positive number of MiB, got {self.prefix_cache_mb}")


def _model_key(adapter, weights_key: tuple) -> tuple:
    return (adapter.identity, str(adapter.dtype), weights_key)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _BudgetedPolicy(CachePolicy):
    """A policy keeping its entries in a ByteLRU of --prefix-cache-mb, which says when one entry
    alone is larger than the budget."""
    stateful = True
    entry = "entry"  # what one entry is, in refusal()

    def __init__(self, capacity_mb: float, weights_key: tuple = ()):
        self.capacity_mb = capacity_mb
        self.lru = ByteLRU(int(capacity_mb * 2**20))
        self.weights_key = weights_key  # the loaded model's (LoadedModel.weights_key): part of every key
        self.refused_bytes = 0  # the largest entry refused since the last clear()

    def _put(self, key, value, nbytes: int) -> None:
        if not self.lru.put(key, value, nbytes):
            self.refused_bytes = max(self.refused_bytes, nbytes)

    def clear(self):
        self.lru.clear()
        self.refused_bytes = 0

    def refusal(self) -> str | None:
        if not self.refused_bytes:
            return None
        size = self.refused_bytes
        size = f"{size / 2**20:,.2f} MiB" if size >= 2**20 / 100 else f"{size:,} bytes"  # (never "0.00 MiB")
        return (f"--prefix-cache-mb {self.capacity_mb:g} cannot hold one {self.entry} ({size}): no request could "
                "reuse it")


class PrefixKVPolicy(_BudgetedPolicy):
    name = "prefix"
    entry = "prefix's keys and values"

    def key(self, adapter, prepared, visual) -> tuple:
        return (*_model_key(adapter, self.weights_key), prepared.prefix_key_ids(), image_content_digest(visual))

    def lookup_prefix(self, adapter, prepared, visual):
        key = self.key(adapter, prepared, visual)
        return PrefixLookup(key, self.lru.get(key))

    def store_prefix(self, lookup, entry, nbytes):
        # The engine saved `entry` as one copy of the prefix (no Python objects deep-copied) and
        # restores it the same way; the stored tensors are never written to.
        self._put(lookup.key, entry, nbytes)

    def stats(self):
        return {"entries": len(self.lru), "bytes": self.lru.bytes, "hits": self.lru.hits, "misses": self.lru.misses,
                "evictions": self.lru.evictions}


class ImageEmbedPolicy(_BudgetedPolicy):
    name = "embedcache"
    entry = "image's embeddings"

    def image_embeds(self, adapter, prepared, compute):
        keys = [(*_model_key(adapter, self.weights_key), p.pixel_digest()) for p in prepared]
        found = [self.lru.get(k) for k in keys]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            for i, embeds in zip(missing, compute(missing)):
                found[i] = embeds
                self._put(keys[i], embeds, _nbytes([embeds]))
        return found, len(missing) < len(prepared)


class PrefixPart(CachePart):
    name = "prefix"
    description = "prefix KV cache: system prompt + image keys/values reused across questions"
    options_class = CacheOptions

    def make_policy(self, options: CacheOptions, weights_key):
        return PrefixKVPolicy(options.prefix_cache_mb, weights_key)


class EmbedCachePart(CachePart):
    name = "embedcache"
    description = "seed fork's cache: image embeddings by SHA-256 of the preprocessed image (LLM prefill still runs)"
    options_class = CacheOptions

    def make_policy(self, options: CacheOptions, weights_key):
        return ImageEmbedPolicy(options.prefix_cache_mb, weights_key)


PARTS = [PrefixPart(), EmbedCachePart()]

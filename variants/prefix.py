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

from bench.engines.cache_policy import CachePolicy, PrefixLookup
from bench.engines.lru import ByteLRU
from bench.models.base import image_content_digest
from variants.base import CachePart


def _model_key(adapter) -> tuple:
    return (adapter.identity, str(adapter.dtype), adapter.weights_key)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PrefixKVPolicy(CachePolicy):
    name = "prefix"
    stateful = True

    def __init__(self, capacity_mb: float):
        self.lru = ByteLRU(int(capacity_mb * 2**20))

    def key(self, adapter, prepared, visual) -> tuple:
        return (*_model_key(adapter), prepared.prefix_key_ids(), image_content_digest(visual))

    def lookup_prefix(self, adapter, prepared, visual):
        key = self.key(adapter, prepared, visual)
        return PrefixLookup(key, self.lru.get(key))

    def store_prefix(self, lookup, entry, nbytes):
        # The engine saved `entry` as one copy of the prefix (no Python objects deep-copied) and
        # restores it the same way; the stored tensors are never written to.
        self.lru.put(lookup.key, entry, nbytes)

    def clear(self):
        self.lru.clear()

    def stats(self):
        return {"entries": len(self.lru), "bytes": self.lru.bytes, "hits": self.lru.hits, "misses": self.lru.misses,
                "evictions": self.lru.evictions}


class ImageEmbedPolicy(CachePolicy):
    name = "embedcache"
    stateful = True

    def __init__(self, capacity_mb: float):
        self.lru = ByteLRU(int(capacity_mb * 2**20))

    def image_embeds(self, adapter, prepared, compute):
        keys = [(*_model_key(adapter), p.pixel_digest()) for p in prepared]
        found = [self.lru.get(k) for k in keys]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            for i, embeds in zip(missing, compute(missing)):
                found[i] = embeds
                self.lru.put(keys[i], embeds, _nbytes([embeds]))
        return found, len(missing) < len(prepared)

    def clear(self):
        self.lru.clear()


class PrefixPart(CachePart):
    name = "prefix"
    description = "prefix KV cache: system prompt + image keys/values reused across questions"

    def make_policy(self, options):
        return PrefixKVPolicy(options.get("prefix_cache_mb", 4096))


class EmbedCachePart(CachePart):
    name = "embedcache"
    description = "seed fork's cache: image embeddings by SHA-256 of the preprocessed image (LLM prefill still runs)"

    def make_policy(self, options):
        return ImageEmbedPolicy(options.get("prefix_cache_mb", 4096))


PARTS = [PrefixPart(), EmbedCachePart()]

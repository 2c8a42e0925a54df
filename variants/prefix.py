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

from bench.cache_policy import CachePolicy, PrefixHit
from bench.lru import ByteLRU
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
        self._pending_key = None

    def key(self, adapter, prepared, visual) -> tuple:
        return (*_model_key(adapter), prepared.prefix_key_ids(), image_content_digest(visual))

    def lookup_prefix(self, adapter, prepared, visual):
        key = self.key(adapter, prepared, visual)
        entry = self.lru.get(key)
        self._pending_key = key if entry is None else None
        return entry

    def restore_prefix(self, entry, cache):
        # One copy of the prefix into the request's working cache; no Python objects are
        # deep-copied. The static engines' KV buffers take it in one copy kernel; a
        # transformers DynamicCache concatenates it through the Cache API (the stored tensors
        # are never written to).
        if hasattr(cache, "load_prefix"):
            return PrefixHit(cached_tokens=cache.load_prefix(entry))
        for layer, (k, v) in enumerate(entry):
            cache.update(k, v, layer)
        return PrefixHit(cached_tokens=entry[0][0].shape[-2])

    def store_prefix(self, adapter, prepared, cache):
        if self._pending_key is None:
            return
        n = prepared.prefix_tokens
        if hasattr(cache, "save_prefix"):  # the static engines' KV buffers: one tensor, one copy
            entry = cache.save_prefix(n)
            self.lru.put(self._pending_key, entry, _nbytes([entry]))
        else:
            entry = [(layer.keys[..., :n, :].clone(), layer.values[..., :n, :].clone()) for layer in cache.layers]
            self.lru.put(self._pending_key, entry, _nbytes(t for kv in entry for t in kv))
        self._pending_key = None

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
        key = (*_model_key(adapter), prepared.pixel_digest())
        cached = self.lru.get(key)
        if cached is not None:
            return cached, True
        embeds = compute()
        self.lru.put(key, embeds, _nbytes([embeds]))
        return embeds, False

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

"""Decoded request images, kept by the bytes they arrived as (`serve --image-cache-mb`).

A request that shows the same image file as an earlier one (the shared system prompt + image a
prefix cache reuses) gets the image decoded then, instead of decoding it again: PNG decoding of
the 640x480 demo image took 2.4 ms on a 2-core CPU machine, a noticeable share of a 7B model's
TTFT on an H200 (results/reference/h200/llava-1.5-7b-fp16-graph-inprocess). An in-process run
decodes its image once too, so with the cache a served TTFT and an in-process one count the same
work. Images are keyed by a 128-bit XXH3 of their encoded bytes (two files of the same pixels
are two entries, never a wrong hit), bounded by their decoded size (width x height x 4 bytes, as
Pillow keeps RGB) in a byte-bounded LRU; the server's /metrics counts hits and misses. Several
request threads parse at once, so every access holds a lock.
"""
from __future__ import annotations

import threading

import xxhash

from bench.engines.lru import ByteLRU

DEFAULT_MB = 256


class DecodedImages:
    def __init__(self, capacity_mb: float, on_lookup=None):
        self._lru = ByteLRU(int(capacity_mb * 2**20))
        self._lock = threading.Lock()
        self._on_lookup = on_lookup  # called with True (hit) or False (miss)

    def cached(self, data: bytes):
        """The image `data` decoded to earlier, or None; not counted (a request looks its images up
        here first, and counts them with hits() once it has them all, or decodes them with
        get_or_decode, which counts)."""
        return self._get(xxhash.xxh3_128_digest(data))

    def _get(self, key: bytes):
        with self._lock:
            return self._lru.get(key)

    def hits(self, n: int) -> None:
        """Count `n` lookups that found their image (with cached)."""
        if self._on_lookup is not None:
            for _ in range(n):
                self._on_lookup(True)

    def get_or_decode(self, data: bytes, decode):
        """The image `data` decodes to: the kept one, or decode(data), kept when it fits."""
        key = xxhash.xxh3_128_digest(data)
        image = self._get(key)
        if self._on_lookup is not None:
            self._on_lookup(image is not None)
        if image is not None:
            return image
        image = decode(data)
        with self._lock:
            self._lru.put(key, image, image.width * image.height * 4)  # Pillow keeps RGB pixels in 4 bytes
        return image

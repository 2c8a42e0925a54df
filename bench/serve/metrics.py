"""The server's /metrics, in the Prometheus text format (prometheus_client, one registry per server)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vlm_requests", "chat completion requests by outcome (ok, error, cancelled, invalid)",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("vlm_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.generated_tokens = Counter("vlm_generation_tokens", "tokens generated for completed requests",
                                        registry=r)
        self.prefix_hits = Counter("vlm_prefix_cache_hits", "requests that reused a cached prefix (variants with "
                                   "a cache)", registry=r)
        self.prefix_misses = Counter("vlm_prefix_cache_misses", "requests that prefilled their prefix (variants "
                                     "with a cache)", registry=r)
        self.image_hits = Counter("vlm_image_cache_hits", "request images found decoded (sent before in the same "
                                  "bytes)", registry=r)
        self.image_misses = Counter("vlm_image_cache_misses", "request images decoded", registry=r)
        self.queue_depth = Gauge("vlm_queue_depth", "requests waiting for the engine", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)

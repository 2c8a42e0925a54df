"""The server's /metrics, in the Prometheus text format (prometheus_client, one registry per server)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# seconds; vLLM's time-to-first-token buckets, finer at the bottom for small models
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1,
                   0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


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
        self.ttft = Histogram("vlm_time_to_first_token_seconds", "request headers read -> its first token handed "
                              "to the HTTP side (the server's part of a client's TTFT)", buckets=SECONDS_BUCKETS, registry=r)
        self.queue_time = Histogram("vlm_request_queue_time_seconds",
                                    "request queued -> its batch closes (other batches, the batching window)",
                                    buckets=SECONDS_BUCKETS, registry=r)
        self.queue_depth = Gauge("vlm_queue_depth", "requests waiting for the engine", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)

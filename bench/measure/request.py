"""What an engine returns for one request (or one batch run as one): its timed phases and tokens."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestResult:
    tokens: list[int]  # the first request's tokens
    phases_ms: dict[str, float]  # preprocess, lookup, restore, vision, prefill, store, decode (summed)
    step_ms: list[float]  # one entry per decode step (new_tokens - 1)
    e2e_ms: float
    prompt_tokens: int  # the longest request's prompt (what every row of a batch is padded to)
    prefix_tokens: int
    cached_tokens: int
    cache_hit: bool
    batch_size: int = 1
    batch_tokens: list[list[int]] = field(default_factory=list)  # every request's tokens
    extra: dict = field(default_factory=dict)
    cpu_phases_ms: dict[str, float] | None = None  # process CPU time per phase (CPU device only)

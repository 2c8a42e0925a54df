"""Decode steps' token ids to an engine's per-token hook (a server streams them) without stalling
the GPU.

Reading a step's ids on the host (`.tolist()`) waits for everything queued before it, so a decode
loop that reads each step's ids right after queuing that step leaves the GPU idle while the host
hands the ids over and queues the next step. On CUDA the feed copies a step's ids to pinned host
memory asynchronously and hands them to the hook after the next step is queued: the wait then
ends when the earlier step finishes, with the next one already running, and each id reaches the
hook as soon as its step is done. (vLLM's asynchronous output processing does the same.) On the
CPU the ids go to the hook at once.
"""
from __future__ import annotations

import torch


class TokenFeed:
    def __init__(self, hook):
        """`hook`: the engine's per-token hook; None: no hook, and the feed does nothing (no copy,
        no host sync)."""
        self.hook = hook
        self._pending: tuple[torch.Tensor, object] | None = None
        self._events: list = []  # two CUDA events, used in turn: the held step's and the newest
        self._turn = 0

    def push(self, tokens: torch.Tensor) -> None:
        """A step's ids [B] (call after queuing the step that made them, before queuing the next);
        the previous step's ids go to the hook now."""
        if self.hook is None:
            return
        if not tokens.is_cuda:
            self.hook(tokens.tolist())
            return
        if not self._events:
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        host = tokens.to("cpu", non_blocking=True)  # pinned memory (torch's caching host allocator)
        self._turn ^= 1
        copied = self._events[self._turn]  # not the held step's event
        copied.record()
        self.flush()
        self._pending = (host, copied)

    def flush(self) -> None:
        """The ids still held (the last step's) to the hook, once they are on the host."""
        if self._pending is not None:
            host, copied = self._pending
            self._pending = None
            copied.synchronize()
            self.hook(host.tolist())

"""The one timer abstraction: a timeline of marks.

Each `mark(label)` ends the phase called `label`; the phase began at the previous mark, so
phases tile the request with no gaps and add up to the timeline's span. On CUDA a mark
records an event (no synchronisation on the hot path); elsewhere it reads perf_counter.
Host-only phases (CPU preprocessing) use the host clock on every device. Conversion to
milliseconds happens once, in `phases_ms()`, after a single synchronize.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class _Mark:
    label: str
    host_s: float
    event: object | None  # torch.cuda.Event (CUDA only)
    host_only: bool  # the phase ending here is measured on the host clock


class Timeline:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[_Mark] = []

    def mark(self, label: str, host_only: bool = False) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append(_Mark(label, time.perf_counter(), event, host_only))

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def phases_ms(self) -> list[tuple[str, float]]:
        """[(label, ms)] for every mark after the first."""
        self.synchronize()
        out = []
        for prev, cur in zip(self._marks, self._marks[1:]):
            if not cur.host_only and prev.event is not None and cur.event is not None:
                ms = prev.event.elapsed_time(cur.event)
            else:
                ms = (cur.host_s - prev.host_s) * 1e3
            out.append((cur.label, ms))
        return out

    def span_ms(self) -> float:
        """Wall time from the first mark to now (after synchronize)."""
        self.synchronize()
        return (time.perf_counter() - self._marks[0].host_s) * 1e3


def sum_by_label(phases: list[tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for label, ms in phases:
        totals[label] = totals.get(label, 0.0) + ms
    return totals

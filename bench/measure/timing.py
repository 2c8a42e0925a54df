"""The one timer abstraction: a timeline of marks.

Each `mark(label)` ends the phase called `label`; the phase began at the previous mark, so
phases tile the request with no gaps and add up to the timeline's span. On CUDA a mark
records an event (no synchronisation on the hot path); elsewhere it reads perf_counter.
Host-only phases (CPU preprocessing) end on the host clock on every device. Conversion to
milliseconds happens once, in `phases_ms()`, after a single synchronize, on one clock (`tile`):
a host-only phase that ran while the GPU was still on the phase before it (a batch's images
preprocessed while its cache is being filled) counts only from where that phase ended, so the
overlap is not counted twice. On the CPU device each
mark also reads the process's CPU time (`cpu_phases_ms()`): the work a phase did, which another
program competing for the cores does not change the way it changes wall time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.measure.capture import capturing


@dataclass
class _Mark:
    label: str
    host_s: float
    event: object | None  # torch.cuda.Event (CUDA only)
    host_only: bool  # the phase ending here is measured on the host clock
    cpu_s: float | None = None  # process CPU time (CPU device only)


# Idle timing events per device, reused by later timelines: a request marks ~130 times (one per
# decode step) and a new torch.cuda.Event costs a Python object and a cudaEventCreate on the host
# path, five of them before a warm request's first token. (Hand-written: torch keeps no such pool.)
_IDLE_EVENTS: dict[int, list] = {}


class Timeline:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[_Mark] = []
        self._phases: list[tuple[str, float]] | None = None
        self._idle = _IDLE_EVENTS.setdefault(torch.cuda.current_device(), []) if self.cuda else []

    def mark(self, label: str, host_only: bool = False) -> None:
        event = None
        if self.cuda:
            event = self._idle.pop() if self._idle else torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append(_Mark(label, time.perf_counter(), event, host_only,
                                 None if self.cuda else time.process_time()))

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def phases_ms(self) -> list[tuple[str, float]]:
        """[(label, ms)] for every mark after the first (read once: the events then go back to
        the idle pool)."""
        if self._phases is not None:
            return list(self._phases)
        self.synchronize()
        first = self._marks[0]
        out = tile([(m.label, (m.host_s - first.host_s) * 1e3,
                     None if m.host_only or first.event is None or m.event is None
                     else first.event.elapsed_time(m.event)) for m in self._marks[1:]])
        self._phases = out
        self._idle.extend(m.event for m in self._marks if m.event is not None)
        for m in self._marks:
            m.event = None
        return list(out)

    def cpu_phases_ms(self) -> list[tuple[str, float]] | None:
        """[(label, process CPU ms)] for every mark after the first; None on CUDA."""
        if self.cuda:
            return None
        return [(cur.label, (cur.cpu_s - prev.cpu_s) * 1e3) for prev, cur in zip(self._marks, self._marks[1:])]

    def span_ms(self) -> float:
        """Wall time from the first mark to now (after synchronize)."""
        self.synchronize()
        return (time.perf_counter() - self._marks[0].host_s) * 1e3


def tile(marks: list[tuple[str, float, float | None]]) -> list[tuple[str, float]]:
    """Phases [(label, ms)] from marks after the first, each (label, host ms since the first
    mark, GPU ms since the first mark's event or None for a host-only mark), on one clock: a mark
    is where its phase ended (a GPU mark: when the GPU reached its event; a host-only one: when
    the host got there), and no earlier than the mark before it. The first event is taken to fire
    as it is recorded (the GPU idle when a timeline starts, as requests start after a
    synchronize); GPU marks alone give their events' own differences. So phases add up to the
    span, and a host-only phase hidden under GPU work of the phase before it counts only what
    the GPU had not already covered (0 when wholly hidden)."""
    out, at = [], 0.0
    for label, host_ms, gpu_ms in marks:
        end = max(at, host_ms if gpu_ms is None else gpu_ms)
        out.append((label, end - at))
        at = end
    return out


def sum_by_label(phases: list[tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for label, ms in phases:
        totals[label] = totals.get(label, 0.0) + ms
    return totals


L2_MULTIPLE = 2  # timed calls over weights cycle through copies holding at least this many L2 caches


def copies_past_l2(device: torch.device, nbytes: int) -> int:
    """How many copies of `nbytes` of weights timed calls on CUDA `device` cycle through so that
    each call reads its copy from memory, not from the L2 cache: enough to hold L2_MULTIPLE L2 caches
    (at least one)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, -(-L2_MULTIPLE * l2 // max(1, nbytes)))


def call_us(fn, device: torch.device, calls: int | None = None, reps: int | None = None, warmup: int = 3,
            graph: bool = True) -> float:
    """Median time of one call of `fn`, microseconds: what a kernel costs where it runs, timed by
    a Timeline (events on CUDA, the host clock elsewhere), one phase per repetition.

    CUDA with `graph`: `calls` calls captured back to back in one CUDA graph (warmed up on a side
    stream first, as capture wants) and the graph replayed `reps` times, so the time is the GPU's
    without launch overhead (the graph engine replays its steps the same way); a function that
    cannot be captured raises. Otherwise: `calls` calls launched in a row per repetition, so the
    time includes what launching costs the host where the GPU waits for it (as eager engines
    run; fewer calls and repetitions on the CPU by default: a CPU call takes far longer).
    `fn` is called `warmup` + `calls` times in order (a function cycling over several layers
    sees each in turn)."""
    import statistics

    cuda = device.type == "cuda"
    calls = calls or (32 if cuda else 8)
    reps = reps or (15 if cuda else 5)
    if cuda and graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with capturing(captured):
            for _ in range(calls):
                fn()
        run = captured.replay
    else:
        for _ in range(warmup):
            fn()

        def run():
            for _ in range(calls):
                fn()
    timeline = Timeline(device)
    timeline.mark("start")
    for _ in range(reps):
        run()
        timeline.mark("repetition")
    return statistics.median(ms * 1e3 / calls for _, ms in timeline.phases_ms())

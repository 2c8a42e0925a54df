"""The host side of measured runs: torch's CPU threads, and when garbage is collected.

Threads. With a CUDA device the host only processes images (when the processor stays on the
host), tokenizes and launches kernels; torch's default of one thread per core then costs more
than it gives: on the H200 host (16 threads) the CPU image processor took 18 ms median / 31 ms
p90 right after a garbage collection against 5.8 / 6.9 ms with one thread (its worker threads
sleep during the collection's pause and are woken by the next request). `--cpu-threads 0`
(auto) is therefore 1 with a CUDA device, torch's default when the model itself runs on the
CPU. The number used is written to env.json (`host.cpu_threads`).

Garbage collection (lab/gpu_host_gc.py compares the disciplines on the GPU host): before a
workload point's warm-up, one full collection, then `gc.freeze()`, which moves every live object
(the model's modules, the tokenizer, the caches) out of the collector's reach; during a request
the collector is off; after it, outside the timed interval, the young generation is collected
(cheap: frozen objects are never traversed), or an older one once as many young collections
have run as its threshold (gc.get_threshold), as the automatic collector would. A full
collection walks the whole heap and leaves caches and the processor's thread pool cold for the
request that follows: on the H200 the first measured run after one took up to 2 ms longer to
process its image than the rest (5 of 8 groups) (results/reference/h200/*-fp16-prefix-engines,
made with the collection right before the measured runs), so the warm-up runs come after it.
At the end of a variant the heap is unfrozen so the model's reference cycles can be freed.

Memory allocator (pin_allocator). glibc's malloc serves a block above its mmap threshold with
fresh pages from mmap (zero-filled, a page fault on each first touch) and unmaps it on free; the
threshold moves up as such blocks are freed, so the same code either reuses heap memory or
faults in new pages on every call depending on the process's history: tiny-vila's CPU image
processing took 2.4-2.6 ms per request in most processes and 3.8-4.2 ms in about one in eight
(4.7 ms with every block above 64 KiB mmapped), which failed the CPU regression gate with no
change to the code. The threshold is pinned at glibc's largest (32 MiB) and free memory at the
top of the heap is kept up to 1 GiB (the trim threshold), so every process is of the fast kind.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def pin_allocator() -> str:
    """Pin glibc malloc's mmap and trim thresholds (the module's docstring); what env.json records.
    (Hand-written: mallopt has no Python binding, and jemalloc or tcmalloc would have to be
    preloaded before the interpreter starts.)"""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator as it is
        return "unchanged (no glibc mallopt)"
    done = [what for what, param, value in (("mmap threshold 32 MiB", M_MMAP_THRESHOLD, 32 << 20),
                                            ("trim threshold 1 GiB", M_TRIM_THRESHOLD, 1 << 30))
            if mallopt(param, value) == 1]
    return f"glibc malloc: {', '.join(done)}" if done else "unchanged (glibc refused mallopt)"


def cpu_threads(requested: int, device: torch.device) -> int:
    """The torch CPU thread count a run uses: `requested`, or for 0 (auto) 1 with a CUDA device and
    torch's default (every core) on the CPU."""
    if requested:
        return requested
    return 1 if device.type == "cuda" else torch.get_num_threads()


def set_cpu_threads(n: int) -> dict:
    """Set torch's intra-op threads to `n` and pin the allocator (pin_allocator); what env.json
    records."""
    torch.set_num_threads(n)
    return {"cpu_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "allocator": pin_allocator(),
            "gc": "full collection + gc.freeze() before each workload point's warm-up; off during a request; "
                  "young generation collected after it"}


def before_warmup() -> None:
    """One full collection, then freeze what survived (bench.run.host's docstring)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def one_request():
    """The collector is off for the request and its young generation is collected afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        collect_due()


def collect_due() -> None:
    """Collect the young generation, or the oldest generation past its threshold, as the automatic
    collector would have. gc.collect(0) alone only counts towards generation 1: with requests back
    to back (a busy server) the collector is rarely on long enough to run by itself, and what a
    request's end found alive and later dropped in a cycle would never be freed."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    gc.collect(max((g for g in (1, 2) if thresholds[g] and counts[g] >= thresholds[g]), default=0))


def release_frozen() -> None:
    """Unfreeze the heap (a variant is done: its model's cycles may be collected)."""
    gc.unfreeze()

"""Another program saturating every core, for timing tests. A module of its own, importing
nothing heavy: each burner process (spawned) imports it in well under a second, where a test
module importing transformers would take seconds."""
import contextlib
import multiprocessing
import os
import queue
import time


def _burn(stop, burning, ready) -> None:
    ready.put(os.getpid())
    while not stop.is_set():
        if burning.wait(0.05):
            sum(i * i for i in range(10_000))


@contextlib.contextmanager
def cpu_burner():
    """Another program on every core, saturating them while the event it yields is set: started
    (its interpreters up, their imports done) before the event is handed over, so none of that
    falls in a measurement."""
    ctx = multiprocessing.get_context("spawn")
    stop, burning, ready = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_burn, args=(stop, burning, ready), daemon=True) for _ in range(os.cpu_count() or 2)]
    for proc in procs:
        proc.start()
    try:
        started, deadline = 0, time.monotonic() + 120
        while started < len(procs):
            try:
                ready.get(timeout=1)
                started += 1
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"CPU burner: {started} of {len(procs)} processes started "
                                       f"(exit codes of those that ended: {dead})") from None
        yield burning
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

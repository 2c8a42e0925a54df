"""Ctrl-C and SIGTERM: the request recorded (`requested`) and, in a run, KeyboardInterrupt at once.

Python runs a signal handler wherever the main thread is, a finalizer (`__del__`) included, and an
exception raised there is printed and dropped: a run would go on as if nothing were asked, and a
server warming up went on to serve. So the handler records the request, which the runner checks
before each timed run (check()) and the server's waits on its engine thread check as they wake
(bench.serve.worker.EngineThread); a run also raises at once, where that is not dropped.
"""
from __future__ import annotations

import contextlib
import signal
import threading

requested = threading.Event()


def check() -> None:
    """KeyboardInterrupt if a stop was asked for within signals_interrupt (and dropped)."""
    if requested.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_interrupt(signals=(signal.SIGINT, signal.SIGTERM), raise_now: bool = True):
    """Within it, `signals` (SIGTERM: a CI job's timeout, `kill`) are recorded in `requested` and,
    with raise_now, stop the run as Ctrl-C does (KeyboardInterrupt). The previous handlers come
    back after."""
    def handler(signum, frame):
        requested.set()
        if raise_now:
            raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signals are set there only
    requested.clear()
    previous = {s: signal.signal(s, handler) for s in signals} if main_thread else {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        requested.clear()

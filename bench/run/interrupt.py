"""Ctrl-C and SIGTERM during a run: KeyboardInterrupt at once, and the request kept until the run
sees it.

Python runs a signal handler wherever the main thread is, a finalizer (`__del__`) included, and an
exception raised there is printed and dropped: the run would go on as if nothing were asked. So
the handler also records the request, and the runner checks it before each timed run (check()).
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
def signals_interrupt(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within it, `signals` (SIGTERM: a CI job's timeout, `kill`) stop the run as Ctrl-C does:
    KeyboardInterrupt, and the request recorded for check(). The previous handlers come back after."""
    def handler(signum, frame):
        requested.set()
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

"""Progress lines on stderr (the results table goes to stdout at the end). Any layer may log."""
from __future__ import annotations

import sys
import time


def status(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stdout_console(**options):
    """rich's Console for what goes to stdout, whose reader may leave early (`| head`): the rest of
    the output is dropped and the command ends as it would have (rich's own on_broken_pipe ends the
    process with exit 1, which says "a variant failed")."""
    import os

    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())

    return _Console(**options)

"""Progress lines on stderr (the results table goes to stdout at the end). Any layer may log."""
from __future__ import annotations

import sys
import time


def status(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

"""``say``: one log line of headwise's own, in vLLM's format, on stderr."""

from __future__ import annotations

import sys
import time


def say(message: str) -> None:
    """One log line in vLLM's format, tagged [headwise] (vLLM configures only its own loggers)."""
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [headwise] {message}", file=sys.stderr, flush=True)

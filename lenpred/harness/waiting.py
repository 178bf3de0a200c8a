"""Polling a condition with a deadline (tests and benches: Redis writes are write-behind, processes
start asynchronously)."""
from __future__ import annotations

import time
from typing import Callable


def eventually(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """True as soon as `pred()` is truthy, False if it is not within `timeout` seconds (checked once
    more at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())

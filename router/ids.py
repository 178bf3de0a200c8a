"""Request ids the router assigns (the rid the tap, the sidecar and Redis see).

uuid4 per request read the OS random source every time (~2% of the router's CPU under load); a
random 64-bit prefix per process plus a counter is as unique across router replicas and cheap.
"""
from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count()


def new_rid(kind: str = "lp") -> str:
    """`lp-<16 hex process prefix><16 hex counter>`: 32 hex digits like the uuid4 ids before."""
    return f"{kind}-{_PREFIX}{next(_COUNTER):016x}"

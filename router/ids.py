"""Request ids the router assigns (the rid the tap, the sidecar and Redis see).

An rid is also what a client uses to read its request back (`GET /v1/lenpred/requests/{rid}`), so it
must not be guessable: 128 random bits each (docs/SECURITY.md). The OS random source is read in
blocks, not once per request (one `os.urandom` call per rid was ~2% of the router's CPU under load).
"""
from __future__ import annotations

import os

_BLOCK = 4096
_buf = b""
_pos = _BLOCK


def _random16() -> bytes:
    global _buf, _pos
    if _pos + 16 > len(_buf):
        _buf, _pos = os.urandom(_BLOCK), 0
    out = _buf[_pos:_pos + 16]
    _pos += 16
    return out


def _reset() -> None:
    """A forked child must not reuse the parent's buffered random bytes (same rids)."""
    global _buf, _pos
    _buf, _pos = b"", _BLOCK


os.register_at_fork(after_in_child=_reset)


def new_rid(kind: str = "lp") -> str:
    """`lp-<32 hex digits>`: 128 random bits."""
    return f"{kind}-{_random16().hex()}"

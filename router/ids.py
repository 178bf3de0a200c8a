"""Request ids the router assigns (the rid the tap, the sidecar and Redis see).

An rid is also what a client uses to read its request back (`GET /v1/lenpred/requests/{rid}`), so it
must not be guessable: 128 random bits each (docs/SECURITY.md). The OS random source is read in
blocks, not once per request (one `os.urandom` call per rid was ~2% of the router's CPU under load).
Each router process also puts its tag in its rids (`lenpred.contract.keys.rid_tag`): the sidecar
publishes a request's events on its router's own channel.
"""
from __future__ import annotations

import os

from lenpred.contract.keys import TAG_HEX

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


def _new_tag() -> str:
    return os.urandom(TAG_HEX // 2).hex()


_tag = _new_tag()


def router_tag() -> str:
    """This router process's tag: its events channel is `events_channel(ns, router_tag())`."""
    return _tag


def _reset() -> None:
    """A forked child must not reuse the parent's buffered random bytes (same rids), nor its tag
    (its events channel)."""
    global _buf, _pos, _tag
    _buf, _pos, _tag = b"", _BLOCK, _new_tag()


os.register_at_fork(after_in_child=_reset)


def new_rid(kind: str = "lp") -> str:
    """`lp-<router tag>-<32 hex digits>`: 128 random bits after the tag."""
    return f"{kind}-{_tag}-{_random16().hex()}"

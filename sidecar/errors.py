"""Errors shared by the v1 and v2 ingest paths."""
from __future__ import annotations


class BadInput(ValueError):
    """Refused input: the caller gets INVALID_ARGUMENT (or a code-3 ack) with this message."""

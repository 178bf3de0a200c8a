"""The Redis key schema shared by the sidecar (writer) and the router (reader).

Predictions are soft state: losing Redis loses only predictions, never requests.
See docs/REDIS.md for the full description; the record stored under `pred_key` is
`lenpred.contract.prediction.Prediction`.
"""
from __future__ import annotations

DEFAULT_NAMESPACE = "default"
DEFAULT_TTL_S = 600


def pred_key(ns: str, rid: str) -> str:
    """Hash with the latest prediction for one request."""
    return f"lenpred:{ns}:pred:{rid}"


def events_channel(ns: str) -> str:
    """Pub/sub channel: one JSON message per prediction or finished event (push, not poll)."""
    return f"lenpred:{ns}:events"


def finished_stream(ns: str) -> str:
    """Capped stream of finished requests (true lengths) for online calibration and history."""
    return f"lenpred:{ns}:finished"

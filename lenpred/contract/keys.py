"""The Redis key schema shared by the sidecar (writer) and the router (reader).

Predictions are soft state: losing Redis loses only predictions, never requests.
See docs/REDIS.md for the full description.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

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


@dataclass
class PredictionRecord:
    """One prediction as stored in the `pred` hash. Lengths are in tokens."""

    rid: str
    p50: float                # predicted total output length, median
    p90: float                # 90th percentile
    mean: float
    remaining_p50: float      # predicted tokens still to come at `step`
    remaining_p90: float
    step: int                 # tokens decoded when predicted (0 = EGTP at prefill)
    source: str               # "egtp" | "last" (prefill heads) | "plp"
    head_version: str
    ts: float                 # unix seconds when written
    prompt_tokens: int = 0
    true_len: int = -1        # set when the request finished (-1 = not yet)

    def to_hash(self) -> dict[str, str]:
        # true_len is written only by the finished event: a late prediction must not erase it
        return {k: str(v) for k, v in asdict(self).items() if k != "true_len" or v >= 0}

    @classmethod
    def from_hash(cls, h: dict) -> "PredictionRecord":
        h = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in h.items()}
        return cls(
            rid=h["rid"], p50=float(h["p50"]), p90=float(h["p90"]), mean=float(h["mean"]),
            remaining_p50=float(h["remaining_p50"]), remaining_p90=float(h["remaining_p90"]),
            step=int(h["step"]), source=h["source"], head_version=h["head_version"], ts=float(h["ts"]),
            prompt_tokens=int(h.get("prompt_tokens", 0)), true_len=int(h.get("true_len", -1)),
        )

    def to_json(self) -> str:
        return json.dumps({"type": "prediction", **asdict(self)})

"""The Redis key schema shared by the sidecar (writer) and the router (reader).

Predictions are soft state: losing Redis loses only predictions, never requests.
See docs/REDIS.md for the full description; the record stored under `pred_key` is
`lenpred.contract.prediction.Prediction`.
"""
from __future__ import annotations

import re

DEFAULT_NAMESPACE = "default"
DEFAULT_TTL_S = 600


def pred_key(ns: str, rid: str) -> str:
    """Hash with the latest prediction for one request."""
    return f"lenpred:{ns}:pred:{rid}"


def events_channel(ns: str, tag: str = "") -> str:
    """Pub/sub channel: one JSON message per prediction or finished event (push, not poll).
    With `tag`, one router's own channel (see `rid_tag`); without, the shared channel that carries
    events of requests no router tagged (and everything, from sidecars older than the tags)."""
    return f"lenpred:{ns}:events:{tag}" if tag else f"lenpred:{ns}:events"


def events_pattern(ns: str) -> str:
    """Every events channel of a namespace (PSUBSCRIBE: tools that watch all routers' requests)."""
    return f"lenpred:{ns}:events*"


# A router tags the rids it makes: `<kind>-<8 hex: the router's tag>-<32 hex: random>`. The sidecar
# publishes each request's events on that router's channel, so a router parses its own requests'
# events only, not every prediction in the fleet (a fleet of R routers would otherwise make each
# one parse R times its own traffic).
TAG_HEX = 8
_TAGGED = re.compile(r"[a-z]+-([0-9a-f]{%d})-" % TAG_HEX)


def rid_tag(rid: str) -> str:
    """The router tag in `rid`, or "" (an rid no router tagged: the shared channel)."""
    m = _TAGGED.match(rid)
    return m.group(1) if m else ""


def channel_for(ns: str, rid: str) -> str:
    """The events channel of the request `rid`."""
    return events_channel(ns, rid_tag(rid))


def finished_stream(ns: str) -> str:
    """Capped stream of finished requests (true lengths) for online calibration and history."""
    return f"lenpred:{ns}:finished"

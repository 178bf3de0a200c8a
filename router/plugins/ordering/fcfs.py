"""fcfs-orderer: first come, first served."""
from __future__ import annotations

from lenpred.router.interfaces import Orderer, RequestView


class FCFSOrderer(Orderer):
    """Dispatch in arrival order; sends no engine priority."""

    def key(self, req: RequestView, now: float) -> float:
        return req.arrival

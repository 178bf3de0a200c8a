"""fcfs-orderer: first come, first served."""
from __future__ import annotations

from lenpred.router.interfaces import Orderer


class FCFSOrderer(Orderer):
    """Dispatch in arrival order (the Orderer defaults: key = arrival, no engine priority)."""

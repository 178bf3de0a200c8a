"""round-robin-scorer: score 1 for the next replica in turn, 0 for the others."""
from __future__ import annotations

from typing import Sequence

from lenpred.router.interfaces import ReplicaView, RequestView, Scorer


class RoundRobinScorer(Scorer):
    """Cycles through the candidates in name order; the turn advances on each dispatch. Alone with
    max-score-picker it is plain round robin; with other scorers it breaks their ties in turn."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._turn = 0

    def score(self, req: RequestView, replicas: Sequence[ReplicaView]) -> dict[str, float]:
        names = sorted(r.name for r in replicas)
        chosen = names[self._turn % len(names)] if names else None
        return {n: 1.0 if n == chosen else 0.0 for n in names}

    def on_dispatch(self, req: RequestView, replica: str) -> None:
        self._turn += 1

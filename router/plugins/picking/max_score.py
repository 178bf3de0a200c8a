"""max-score-picker: the replica with the highest total score; ties broken at random."""
from __future__ import annotations

from typing import Mapping

from lenpred.router.interfaces import Picker, RequestView


class MaxScorePicker(Picker):
    def pick(self, req: RequestView, scores: Mapping[str, float]) -> str:
        top = max(scores.values())
        best = sorted(n for n, s in scores.items() if s >= top - 1e-12)
        return best[0] if len(best) == 1 else self.handle.rng.choice(best)

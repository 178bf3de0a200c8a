"""weighted-random-picker: pick a replica with probability proportional to its total score."""
from __future__ import annotations

from typing import Mapping

from lenpred.router.interfaces import Picker, RequestView


class WeightedRandomPicker(Picker):
    """Spreads load when scores are close, instead of herding every request onto the argmax
    between two load reports. All-zero scores pick uniformly."""

    def pick(self, req: RequestView, scores: Mapping[str, float]) -> str:
        names = sorted(scores)
        weights = [scores[n] for n in names]
        if sum(weights) <= 0:
            return self.handle.rng.choice(names)
        return self.handle.rng.choices(names, weights=weights)[0]

"""predicted-srpt-orderer: shortest predicted remaining output first, with aging."""
from __future__ import annotations

import math

from pydantic import Field

from lenpred.router.interfaces import Orderer, PluginParameters, RequestView


class PredictedSRPTParameters(PluginParameters):
    quantile: float = Field(0.5, ge=0.5, le=0.99)
    """Quantile of the output-length estimate to order by."""
    aging_seconds: float = Field(20.0, gt=0.0)
    """Starvation guard: a request's effective length halves for every `aging_seconds` it waits,
    so every request is served eventually (a request that waited this long ranks with a new one
    half its size)."""
    engine_priority: bool = True
    """Also send SGLang a `priority` (needs `--enable-priority-scheduling` on the engine)."""
    low_priority_values_first: bool = False
    """Match the engine's `--schedule-low-priority-values-first` (SGLang default: higher first)."""


class PredictedSRPTOrderer(Orderer):
    """Order the router queue by predicted remaining tokens (SJF for requests not yet started),
    with aging as a virtual deadline that does not move with time:

        key = arrival + aging_seconds x log2(1 + remaining)

    Two requests swap places only when one waited `aging_seconds` x log2(size ratio) longer: a
    request that waited `aging_seconds` ranks with a new one half its size, after 2 x
    `aging_seconds` with one a quarter its size. The key changes only when the estimate does, so
    the queue re-keys one request per prediction update (a heap), never re-sorts.

    The engine priority is -ceil(log2(1 + remaining)): a coarse size class, so only large length
    differences exceed SGLang's priority-preemption threshold (default 10 classes apart).
    """

    Parameters = PredictedSRPTParameters
    params: PredictedSRPTParameters

    def key(self, req: RequestView) -> float:
        rem = req.estimate.remaining(self.params.quantile, req.generated)
        return req.arrival + self.params.aging_seconds * math.log2(1.0 + rem)

    def engine_priority(self, req: RequestView, now: float) -> int | None:
        if not self.params.engine_priority:
            return None
        size_class = math.ceil(math.log2(1.0 + req.estimate.remaining(self.params.quantile, req.generated)))
        return size_class if self.params.low_priority_values_first else -size_class

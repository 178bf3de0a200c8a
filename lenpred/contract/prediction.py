"""One output-length prediction: the record the sidecar writes, the store keeps and every reader
uses, and the estimate a reader derives from it. The gRPC `lenpred.v1.Prediction` is its wire form;
the Redis hash and the pub/sub JSON (docs/REDIS.md) are its stored forms.

All the arithmetic about "a prediction made after t decoded tokens" lives here:

- `Prediction.after(step, remaining...)`: the totals are `step + remaining` (the sidecar's PLP head
  predicts what is left; an EGTP/last-token prediction is the same thing at step 0);
- `Estimate.from_record(rec, max_tokens, before)`: what a reader plans with, capped by the
  request's own max tokens and shifted by the tokens earlier attempts of the same request produced
  (a continuation after a move or an FCR cap counts only its own tokens);
- `Estimate.remaining(q, generated)`: tokens still to come once `generated` tokens were seen,
  whatever the step the prediction was made at.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import asdict, dataclass

_Z90 = statistics.NormalDist().inv_cdf(0.9)
_FLOATS = ("p50", "p90", "mean", "remaining_p50", "remaining_p90", "ts")


@dataclass
class Prediction:
    """One prediction as stored in the `pred` hash and published on the events channel. Lengths
    are in tokens; `p50`/`p90`/`mean` are *total* output lengths, `remaining_*` what is still to
    come after `step` decoded tokens."""

    rid: str
    p50: float                # predicted total output length, median
    p90: float                # 90th percentile
    mean: float
    remaining_p50: float      # predicted tokens still to come at `step`
    remaining_p90: float
    step: int                 # tokens decoded when predicted (0 = at prefill)
    source: str               # "egtp" | "last" (prefill heads) | "plp"
    head_version: str
    ts: float                 # unix seconds when written
    prompt_tokens: int = 0
    true_len: int = -1        # set when the request finished (-1 = not yet)

    @classmethod
    def after(cls, rid: str, step: int, remaining_p50: float, remaining_p90: float, remaining_mean: float, *,
              source: str, head_version: str, ts: float, prompt_tokens: int = 0) -> "Prediction":
        """A prediction of what remains after `step` decoded tokens (step 0: at prefill)."""
        return cls(rid=rid, p50=step + remaining_p50, p90=step + remaining_p90, mean=step + remaining_mean,
                   remaining_p50=remaining_p50, remaining_p90=remaining_p90, step=step, source=source,
                   head_version=head_version, ts=ts, prompt_tokens=prompt_tokens)

    def to_hash(self) -> dict[str, str]:
        # true_len is written only by the finished event: a late prediction must not erase it
        return {k: str(v) for k, v in asdict(self).items() if k != "true_len" or v >= 0}

    @classmethod
    def from_hash(cls, h: dict) -> "Prediction":
        """Parse a stored hash or an event (bytes or str keys/values). Raises ValueError (also for
        missing fields and non-finite numbers: a NaN prediction is no prediction)."""
        try:
            h = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in h.items()}
            rec = cls(
                rid=str(h["rid"]), p50=float(h["p50"]), p90=float(h["p90"]), mean=float(h["mean"]),
                remaining_p50=float(h["remaining_p50"]), remaining_p90=float(h["remaining_p90"]),
                step=int(h["step"]), source=str(h["source"]), head_version=str(h["head_version"]),
                ts=float(h["ts"]), prompt_tokens=int(h.get("prompt_tokens", 0)), true_len=int(h.get("true_len", -1)),
            )
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"not a prediction record: {type(e).__name__}: {e}") from None
        if not all(math.isfinite(getattr(rec, f)) for f in _FLOATS):
            raise ValueError(f"prediction for {rec.rid!r} has a non-finite number")
        return rec

    def to_json(self) -> str:
        return json.dumps({"type": "prediction", **asdict(self)})

    # The stored form written in bulk (the sidecar's write-behind): the same hash and the same event
    # as to_hash()/to_json() of Prediction.after(...), built from plain numbers without making a
    # Prediction per row (tests/test_predictions_stored.py checks they are identical).
    HASH_FIELDS = ("rid", "p50", "p90", "mean", "remaining_p50", "remaining_p90", "step", "source",
                   "head_version", "ts", "prompt_tokens")

    @staticmethod
    def stored_after(rid: str, step: int, remaining_p50: float, remaining_p90: float, remaining_mean: float,
                     source: str, head_version: str, ts: float, prompt_tokens: int = 0,
                     _quoted: dict = {}) -> tuple[tuple[str, ...], str]:  # noqa: B006 — a cache
        """(hash values in HASH_FIELDS order, event JSON) of Prediction.after(...)."""
        p50, p90, mean = step + remaining_p50, step + remaining_p90, step + remaining_mean
        q = _quoted.get((source, head_version))
        if q is None:
            if len(_quoted) > 1024:
                _quoted.clear()
            q = _quoted[(source, head_version)] = (json.dumps(source), json.dumps(head_version))
        vals = (rid, repr(float(p50)), repr(float(p90)), repr(float(mean)), repr(float(remaining_p50)),
                repr(float(remaining_p90)), str(int(step)), source, head_version, repr(float(ts)), str(int(prompt_tokens)))
        js = (f'{{"type": "prediction", "rid": {json.dumps(rid)}, "p50": {vals[1]}, "p90": {vals[2]}, '
              f'"mean": {vals[3]}, "remaining_p50": {vals[4]}, "remaining_p90": {vals[5]}, "step": {vals[6]}, '
              f'"source": {q[0]}, "head_version": {q[1]}, "ts": {vals[9]}, "prompt_tokens": {vals[10]}, '
              f'"true_len": -1}}')
        return vals, js


@functools.lru_cache(maxsize=64)
def quantile_factor(q: float) -> float:
    """Where quantile `q` sits between p50 (0) and p90 (1) on a normal scale."""
    return 0.0 if q == 0.5 else 1.0 if q == 0.9 else statistics.NormalDist().inv_cdf(q) / _Z90


def at_quantile(p50: float, p90: float, q: float) -> float:
    """Interpolate (or extrapolate) a length at quantile `q` from its p50 and p90."""
    if q == 0.5:
        return p50
    if q == 0.9:
        return p90
    return max(p50 + (p90 - p50) * quantile_factor(q), 0.0)


@dataclass
class Estimate:
    """Output-length estimate for one request, in tokens: what the router plans with.

    `p50`/`p90` are *total* output lengths; `remaining_*` are the tokens still to come when the
    estimate was made, after `step` tokens had been decoded. `source` is the prediction's source
    (`egtp`, `last`, `plp`), `fallback` (a heuristic: no fresh prediction) or `probe`.
    """

    p50: float
    p90: float
    remaining_p50: float
    remaining_p90: float
    step: int = 0
    source: str = "fallback"
    ts: float = 0.0

    @classmethod
    def from_record(cls, rec: Prediction, max_tokens: int | None = None, before: int = 0) -> "Estimate":
        """The estimate a prediction gives for a request of at most `max_tokens` output tokens
        (None: uncapped) whose earlier attempts already produced `before` tokens; `rec` counts
        only the tokens of its own attempt (a continuation's engine never saw the earlier ones)."""
        own_cap = float("inf") if not max_tokens else float(max(max_tokens - before, 1))
        rem_cap = max(own_cap - rec.step, 0.0)
        return cls(p50=before + min(rec.p50, own_cap), p90=before + min(rec.p90, own_cap),
                   remaining_p50=min(rec.remaining_p50, rem_cap), remaining_p90=min(rec.remaining_p90, rem_cap),
                   step=before + rec.step, source=rec.source, ts=rec.ts)

    @classmethod
    def constant(cls, p50: float, p90: float, source: str = "fallback") -> "Estimate":
        """An estimate made before anything was decoded (heuristics, probes)."""
        return cls(p50=p50, p90=p90, remaining_p50=p50, remaining_p90=p90, step=0, source=source)

    def total(self, quantile: float) -> float:
        """Total output length at `quantile`, interpolating p50/p90 on a normal scale."""
        return at_quantile(self.p50, self.p90, quantile)

    def remaining(self, quantile: float, generated: int) -> float:
        """Tokens still to come at `quantile`, given `generated` tokens seen so far."""
        rem = at_quantile(self.remaining_p50, self.remaining_p90, quantile)
        return max(rem - max(generated - self.step, 0), 0.0)

    def header(self) -> str:
        return f"p50={self.p50:.0f};p90={self.p90:.0f};source={self.source};step={self.step}"

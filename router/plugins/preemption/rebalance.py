"""predicted-rebalance-preemptor: move a request whose predicted length grew far beyond plan off an
overloaded replica (seed C's rebalancing: "migrate when the gain beats the move cost")."""
from __future__ import annotations

from typing import Sequence

from pydantic import Field

from lenpred.router.interfaces import Move, PluginParameters, Preemptor, ReplicaView, RequestView


class RebalanceParameters(PluginParameters):
    quantile: float = Field(0.5, ge=0.5, le=0.99)
    """Quantile of the remaining-length estimates used for load, gain and growth."""
    growth: float = Field(2.0, ge=1.0)
    """A request is a candidate when its predicted total output has grown to at least `growth` x the
    total planned when it was placed (usually the fallback estimate: nothing is predicted before
    prefill)."""
    min_remaining_tokens: int = Field(64, ge=0)
    """... and at least this many tokens are still predicted to come (moving a nearly done request
    gains nothing)."""
    overload: float = Field(1.3, ge=1.0)
    """A replica is overloaded when its predicted load (KV in use + predicted remaining decode
    tokens) is at least `overload` x the mean over the healthy replicas ..."""
    kv_pressure: float = Field(0.9, gt=0.0, le=1.5)
    """... or at least `kv_pressure` x its KV capacity (`max_total_num_tokens`)."""
    target_headroom: float = Field(0.85, gt=0.0, le=1.0)
    """A target must keep its predicted load within `target_headroom` x its KV capacity after the move."""
    prefill_cost: float = Field(1.0, ge=0.0)
    """Cost of one token re-prefilled on the target (prompt + tokens generated so far), in units
    of predicted decode load (tokens)."""
    move_cost_tokens: float = Field(256.0, ge=0.0)
    """Fixed cost of a move (abort, new request, a gap in the stream), in the same units."""
    max_moves_per_request: int = Field(1, ge=1)
    """Guard rail: a request is moved at most this often."""
    cooldown_s: float = Field(1.0, ge=0.0)
    """Guard rail: no move within this many seconds of the request's placement or last move (its
    prediction must have had time to settle; prevents ping-pong)."""
    max_moves_per_pass: int = Field(4, ge=1)
    """Guard rail: moves decided in one pass (a burst of aborts would itself be a load spike)."""
    interval_s: float = Field(0.05, gt=0.0)
    """How often at most the router asks for moves."""


class RebalancePreemptor(Preemptor):
    """Load of a replica = KV tokens in use + predicted remaining decode tokens (the
    predicted-load-scorer's measure), as a fraction of KV capacity when all replicas report one.
    Moving request r (m = its KV now + its predicted remaining) from s to t changes the larger of
    the two loads from L_s to max(L_s - m, L_t + m): that drop is the gain.
    The cost is re-prefilling its prompt and output so far on t, plus a fixed cost. Candidates on
    overloaded replicas are taken in order of how much their prediction grew since placement; each
    goes to the least-loaded replica with room when gain > cost."""

    Parameters = RebalanceParameters
    params: RebalanceParameters

    def __init__(self, name, params, handle):
        super().__init__(name, params, handle)
        self.interval_s = params.interval_s
        self._planned: dict[str, float] = {}      # rid -> predicted total output when placed
        self._since: dict[str, float] = {}        # rid -> time of placement or last move
        self._moves: dict[str, int] = {}

    def on_dispatch(self, req: RequestView, replica: str) -> None:
        self._planned.setdefault(req.rid, max(req.estimate.total(self.params.quantile), 1.0))
        self._since.setdefault(req.rid, self.handle.clock())

    def on_finish(self, req: RequestView) -> None:
        for d in (self._planned, self._since, self._moves):
            d.pop(req.rid, None)

    def on_move(self, req: RequestView, source: str, target: str, now: float) -> None:
        self._moves[req.rid] = self._moves.get(req.rid, 0) + 1
        self._since[req.rid] = now
        self._planned[req.rid] = max(req.estimate.total(self.params.quantile), 1.0)

    def load(self, r: ReplicaView) -> float:
        return r.current_tokens() + r.predicted_remaining(self.params.quantile)

    def _growth(self, req: RequestView) -> float:
        return req.estimate.total(self.params.quantile) / self._planned.get(req.rid, req.estimate.total(0.5) or 1.0)

    def _candidate(self, req: RequestView, now: float) -> bool:
        p = self.params
        return (not req.pinned and req.estimate.source != "fallback"
                and self._moves.get(req.rid, 0) < p.max_moves_per_request
                and now - self._since.get(req.rid, now) >= p.cooldown_s
                and req.estimate.remaining(p.quantile, req.progress()) >= p.min_remaining_tokens
                and self._growth(req) >= p.growth)

    def select(self, replicas: Sequence[ReplicaView], now: float) -> list[Move]:
        p = self.params
        if len(replicas) < 2:
            return []
        loads = {r.name: self.load(r) for r in replicas}
        cap = {r.name: r.load.max_total_num_tokens for r in replicas}
        # Loads are compared as fractions of capacity when every replica reported one (replicas of
        # different sizes), else as tokens.
        scale = {n: float(c) for n, c in cap.items()} if all(c > 0 for c in cap.values()) else \
            {n: 1.0 for n in cap}

        def util(name: str, load: float | None = None) -> float:
            return (loads[name] if load is None else load) / scale[name]

        def overloaded(name: str) -> bool:
            mean = sum(util(n) for n in loads) / len(loads)
            return util(name) >= p.overload * mean or (cap[name] > 0 and loads[name] >= p.kv_pressure * cap[name])

        cands = [(self._growth(req), r.name, req) for r in replicas if overloaded(r.name)
                 for req in r.inflight.values() if self._candidate(req, now)]
        cands.sort(key=lambda c: -c[0])
        moves: list[Move] = []
        for growth, src, req in cands:
            if len(moves) >= p.max_moves_per_pass:
                break
            if not overloaded(src):
                break
            done = req.progress()
            size = req.prompt_tokens + done + req.estimate.remaining(p.quantile, done)
            cost = p.prefill_cost * (req.prompt_tokens + done) + p.move_cost_tokens
            best, best_gain = None, 0.0
            for dst in loads:
                if dst == src or (cap[dst] > 0 and loads[dst] + size > p.target_headroom * cap[dst]):
                    continue
                # how much the move lowers the larger of the two (relative) loads, in source tokens
                gain = (util(src) - max(util(src, loads[src] - size), util(dst, loads[dst] + size))) * scale[src]
                if gain > best_gain:
                    best, best_gain = dst, gain
            if best is None or best_gain <= cost:
                continue
            loads[src] -= size
            loads[best] += size
            moves.append(Move(req.rid, best, f"growth x{growth:.1f}, gain {best_gain:.0f} > cost {cost:.0f} tokens"))
        return moves

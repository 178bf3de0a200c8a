"""Prometheus metrics, prefix `lenpred_router_`. One registry per app so tests can run many."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FAST_BUCKETS = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class RouterMetrics:
    def __init__(self) -> None:
        self._answered: dict = {}
        self._estimates: dict = {}
        self._transitions: dict = {}
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lenpred_router_requests", "Requests answered, by API and HTTP status.",
                                ["api", "code"], registry=r)
        self.duration = Histogram("lenpred_router_request_duration_seconds",
                                  "Time from arrival to the last byte sent.", ["api"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("lenpred_router_queue_wait_seconds", "Time spent in the router queue.",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.schedule = Histogram("lenpred_router_schedule_duration_seconds",
                                  "Admission + ordering + placement time of one dispatch pass.",
                                  buckets=_FAST_BUCKETS, registry=r)
        self.dropped = Counter("lenpred_router_dropped", "Requests not served, by reason.", ["reason"], registry=r)
        self.estimates = Counter("lenpred_router_estimates",
                                 "Output-length estimates in use at dispatch, by source (egtp, plp, fallback).",
                                 ["source"], registry=r)
        self.predictions = Counter("lenpred_router_predictions_received",
                                   "Predictions pushed from Redis for requests in flight.", registry=r)
        self.probes = Counter("lenpred_router_probes",
                              "Probe-then-dispatch probes, by outcome (prediction | timeout | failed).",
                              ["outcome"], registry=r)
        self.retries = Counter("lenpred_router_dispatch_retries",
                               "Requests re-placed because their replica refused the connection.", registry=r)
        self.preemptions = Counter("lenpred_router_preemptions",
                                   "Running requests moved to another replica (aborted there, continued here).",
                                   registry=r)
        self.moves_late = Counter("lenpred_router_preemptions_too_late",
                                  "Moves decided for requests that finished before the abort landed.", registry=r)
        self.reloads = Counter("lenpred_router_policy_reloads", "Policy file reloads, by result.", ["result"],
                               registry=r)
        self.redispatches = Counter("lenpred_router_redispatches",
                                    "Requests sent to another replica after their attempt failed before the first "
                                    "byte (error, timeout, replica ejected).", registry=r)
        self.evacuations = Counter("lenpred_router_evacuations",
                                   "Waits for a first byte cut short because the replica left the pool.", registry=r)
        self.stale_retries = Counter("lenpred_router_stale_connection_retries",
                                     "Requests retried once because a pooled connection had been closed by the "
                                     "replica.", registry=r)
        self.events_malformed = Counter("lenpred_router_events_malformed",
                                        "Events on the Redis channel skipped as malformed.", registry=r)
        self.lengths_ignored = Counter("lenpred_router_lengths_ignored",
                                       "Finished lengths not learned as implausible (above the request's max "
                                       "tokens or predictions.fallback.max_observed_tokens, negative, not integers).",
                                       registry=r)
        self.task_failures = Counter("lenpred_router_background_task_failures",
                                     "Background loops that died and were restarted, by task.", ["task"], registry=r)
        self.policy_invalid = Gauge("lenpred_router_policy_invalid",
                                    "1 while the policy file on disk is invalid (the last good one serves).",
                                    registry=r)
        self.auth_failures = Counter("lenpred_router_auth_failures",
                                     "Requests refused for a missing/unknown API key (401) or a missing scope (403).",
                                     ["code"], registry=r)
        self.refused = Counter("lenpred_router_refused",
                               "Requests refused before routing, by HTTP status (bad input, limits).", ["code"],
                               registry=r)
        self.transitions = Counter("lenpred_router_request_transitions",
                                   "Request state changes (router/lifecycle.py), by from and to state.",
                                   ["from_state", "to_state"], registry=r)
        self.illegal_transitions = Counter("lenpred_router_illegal_transitions",
                                           "State changes the request state machine refused (a router bug).",
                                           registry=r)
        self.queue_depth = Gauge("lenpred_router_queue_depth", "Requests waiting in the router queue.", registry=r)
        self.redis_connected = Gauge("lenpred_router_redis_connected", "1 while the event stream is followed.",
                                     registry=r)
        self.replica_healthy = Gauge("lenpred_router_replica_healthy", "1 while the replica is in the pool.",
                                     ["replica"], registry=r)
        self.replica_inflight = Gauge("lenpred_router_replica_inflight", "Requests this router has running there.",
                                      ["replica"], registry=r)
        self.replica_predicted = Gauge("lenpred_router_replica_predicted_remaining_tokens",
                                       "Predicted decode tokens still to come there (p50).", ["replica"], registry=r)
        self.replica_kv_used = Gauge("lenpred_router_replica_kv_used_tokens",
                                     "KV tokens in use as last reported by /v1/loads.", ["replica"], registry=r)

    # The request path's metrics, with labelled children cached: `.labels()` costs a lock and a
    # tuple lookup per call, a visible share of the router's per-request CPU.
    def answered(self, api: str, status: int, seconds: float | None = None) -> None:
        key = (api, status)
        child = self._answered.get(key)
        if child is None:
            child = self._answered[key] = (self.requests.labels(api, str(status)), self.duration.labels(api))
        child[0].inc()
        if seconds is not None:
            child[1].observe(seconds)

    def dispatched(self, source: str, queued_s: float) -> None:
        child = self._estimates.get(source)
        if child is None:
            child = self._estimates[source] = self.estimates.labels(source)
        child.inc()
        self.queue_wait.observe(queued_s)

    def transition(self, frm, to) -> None:
        key = (frm, to)
        child = self._transitions.get(key)
        if child is None:
            child = self._transitions[key] = self.transitions.labels(frm.value, to.value)
        child.inc()

    def illegal_transition(self, frm, to) -> None:
        self.illegal_transitions.inc()

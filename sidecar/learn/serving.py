"""The sidecar's side of online learning: one `Learning` object per sidecar process.

- `recorder`: the ExampleRecorder the ingest path calls (see recorder.py);
- a watcher task on the event loop that polls each model's serving.json every `poll_s`: a new
  version is loaded off the loop (a thread) and swapped into the HeadRegistry in one step on the
  loop, so streams keep flowing and no message sees half a swap; older learned versions of that
  model are removed (a micro-batch already holding one finishes with it). A new calibration is
  applied by replacing the heads' calibration dicts. The kill switch (control.json) with
  "revert": true removes the model's learned heads; recording and learning stop either way;
- the learner process, started and restarted with backoff when it dies (counted, logged, and
  reported by `health()`);
- Prometheus gauges in the sidecar's registry.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
import time

from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Gauge

from lenpred.sidecar.heads import load_head
from lenpred.sidecar.learn.config import LearnConfig
from lenpred.sidecar.learn.recorder import ExampleRecorder
from lenpred.sidecar.learn.store import ModelStore

log = logging.getLogger("lenpred.sidecar.learn")
HEALTH_NAME = "lenpred.learn"


class LearnMetrics:
    def __init__(self, registry):
        r = registry
        self.samples = Counter("lenpred_learn_samples", "Finished requests recorded as examples", ["model"], registry=r)
        self.stored = Gauge("lenpred_learn_stored_requests", "Requests in the on-disk store", ["model"], registry=r)
        self.live_mae = Gauge("lenpred_learn_live_mae_tokens", "MAE of the served prefill prediction, recent finished requests", ["model"], registry=r)
        self.live_cov = Gauge("lenpred_learn_live_p90_coverage", "p90 coverage of the served prediction, recent finished requests", ["model"], registry=r)
        self.version = Gauge("lenpred_learn_head_version_info", "Learned head version being served (value 1)", ["model", "version"], registry=r)
        self.last_promotion = Gauge("lenpred_learn_last_promotion_timestamp_seconds", "Time of the last promotion", ["model"], registry=r)
        self.rejected = Gauge("lenpred_learn_rejected_candidates", "Candidates the learner did not promote", ["model"], registry=r)
        self.dropped = Counter("lenpred_learn_dropped_rows", "Hook calls or requests not recorded", ["reason"], registry=r)
        self.recorder_up = Gauge("lenpred_learn_recorder_up", "1 while the recorder thread runs", registry=r)
        self.learner_up = Gauge("lenpred_learn_learner_up", "1 while the learner process runs", registry=r)
        self.learner_restarts = Counter("lenpred_learn_learner_restarts", "Learner process restarts", registry=r)
        self.swaps = Counter("lenpred_learn_hot_swaps", "Learned head versions swapped in", ["model"], registry=r)


class Learning:
    def __init__(self, cfg: LearnConfig, heads, metrics_registry):
        self.cfg = cfg
        self.heads = heads                      # the sidecar's HeadRegistry
        self.m = LearnMetrics(metrics_registry)
        self.recorder = ExampleRecorder(cfg, self.m)
        self.m.recorder_up.set(1)
        self.loaded: dict[tuple, tuple[str, int]] = {}   # (model, d, layer) -> (version, calibration_seq)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._next_start = 0.0
        self._task: asyncio.Task | None = None
        self.watch_error: str | None = None
        self.health_svc = None  # the sidecar's grpc health servicer: service "lenpred.learn"

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.sync_once_blocking()  # a restarted sidecar serves the last promoted heads at once
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.recorder.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def health(self) -> str | None:
        """None when healthy, else what is wrong (the sidecar reports it)."""
        if self.recorder.error:
            return f"learning recorder died: {self.recorder.error}"
        if self.watch_error:
            return f"learned-head watcher failing: {self.watch_error}"
        if self.cfg.spawn_learner and self.restarts and (self.proc is None or self.proc.poll() is not None):
            return f"learner process down (restarted {self.restarts} times)"
        return None

    def _supervise(self) -> None:
        if not self.cfg.spawn_learner:
            return
        if self.proc is not None and self.proc.poll() is None:
            self.m.learner_up.set(1)
            return
        self.m.learner_up.set(0)
        now = time.monotonic()
        if now < self._next_start:
            return
        if self.proc is not None:
            self.restarts += 1
            self.m.learner_restarts.inc()
            log.error("learner process exited with %s; restarting (%d)", self.proc.returncode, self.restarts)
        self._next_start = now + min(60.0, 2.0 ** min(self.restarts, 6))
        nice = self.cfg.learner_nice
        self.proc = subprocess.Popen([sys.executable, "-m", "lenpred.cli", "learn", "run", "--config-json",
                                      self.cfg.model_dump_json()], stdin=subprocess.DEVNULL,
                                     env=_learner_env(self.cfg.threads), preexec_fn=lambda: os.nice(nice))

    # ------------------------------------------------------------------ hot swap
    async def _watch(self) -> None:
        while True:
            try:
                self._supervise()
                await self.sync_once()
                self.watch_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep serving the current heads; say so
                self.watch_error = f"{type(e).__name__}: {e}"
                log.exception("learned-head watcher step failed")
            if self.health_svc is not None:
                bad = self.health()
                await self.health_svc.set(HEALTH_NAME, health_pb2.HealthCheckResponse.NOT_SERVING if bad
                                          else health_pb2.HealthCheckResponse.SERVING)
            await asyncio.sleep(self.cfg.poll_s)

    def _plan(self):
        """What to change, read from disk: [(store, serving dict or None, revert?)]."""
        out = []
        for st in ModelStore.all(self.cfg.dir):
            ctl = st.read("control.json") or {}
            revert = not ctl.get("enabled", True) and ctl.get("revert", False)
            out.append((st, None if revert else st.read("serving.json"), revert))
        return out

    def _load(self, st: ModelStore, sv: dict) -> list:
        d = st.heads / sv["version"]
        heads = [load_head(d / f"{k}.safetensors", self.heads.device) for k in ("last", "plp")
                 if (d / f"{k}.safetensors").exists()]
        for h in heads:
            h.meta.calibration = {**h.meta.calibration, **sv.get("calibration", {}).get(h.meta.kind, {})}
        return heads

    def _apply(self, st: ModelStore, sv: dict | None, heads: list | None) -> None:
        """On the event loop: one step, no await in between."""
        key = (st.model_id, st.hidden_size, st.layer)
        if sv is None:
            for k in [k for k in self.heads.pairs if k[:3] == key and k[3].startswith("online-")]:
                self.heads.pairs.pop(k, None)
            self.loaded.pop(key, None)
            return
        if heads is not None:
            for h in heads:
                self.heads.add(h)
            for k in [k for k in self.heads.pairs if k[:3] == key and k[3].startswith("online-") and k[3] != sv["version"]]:
                self.heads.pairs.pop(k, None)
            self.m.version.clear()
            self.m.version.labels(st.model_id, sv["version"]).set(1)
            self.m.swaps.labels(st.model_id).inc()
            log.info("serving learned heads %s for %s", sv["version"], st.model_id)
        else:
            pair = self.heads.pairs.get((*key, sv["version"]))
            for h in (pair.heads() if pair else []):
                h.meta.calibration = {**h.meta.calibration, **sv.get("calibration", {}).get(h.meta.kind, {})}
        self.loaded[key] = (sv["version"], int(sv.get("calibration_seq", 0)))

    def _todo(self, st, sv) -> str:
        key = (st.model_id, st.hidden_size, st.layer)
        cur = self.loaded.get(key)
        if sv is None:
            return "revert" if cur else ""
        if cur is None or cur[0] != sv["version"]:
            return "load"
        return "calibrate" if cur[1] != int(sv.get("calibration_seq", 0)) else ""

    async def sync_once(self) -> None:
        for st, sv, _ in await asyncio.to_thread(self._plan):
            todo = self._todo(st, sv)
            if todo == "load":
                self._apply(st, sv, await asyncio.to_thread(self._load, st, sv))
            elif todo:
                self._apply(st, sv, None)
        self._gauges()

    def sync_once_blocking(self) -> None:
        for st, sv, _ in self._plan():
            todo = self._todo(st, sv)
            if todo:
                self._apply(st, sv, self._load(st, sv) if todo == "load" else None)

    def _gauges(self) -> None:
        for key, lv in list(self.recorder.live.items()):
            mae, cov = lv.mae(), lv.coverage()
            if not math.isnan(mae):
                self.m.live_mae.labels(key[0]).set(mae)
                self.m.live_cov.labels(key[0]).set(cov)
        for st in self.recorder.stores.values():
            state = st.read("state.json") or {}
            self.m.stored.labels(st.model_id).set(state.get("requests", 0))
            self.m.rejected.labels(st.model_id).set(state.get("rejected", 0))
            if state.get("last_promotion"):
                self.m.last_promotion.labels(st.model_id).set(state["last_promotion"])


def _learner_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

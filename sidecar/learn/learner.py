"""The learner: its own process (`lenpred learn run --dir DIR`, spawned by the sidecar), its own
torch thread budget. For every enabled model in the store it

1. trains a candidate (the served heads: last-token prefill head + PLP over [h_last ; h_t]) with
   `lenpred.train.train.fit_served` — the code `lenpred train` uses — on the train slice,
   early-stopped and calibrated on the validation slice; first once `min_finished` requests are
   recorded (cold start), then every `retrain_every` new ones or `retrain_interval_s`;
2. evaluates candidate and serving head on the live test slice and promotes the candidate only if
   its MAE is lower and its p90 coverage lies in `coverage_band` (with nothing served yet, it must
   beat the train slice's median length); promotion = heads written to heads/<version>/, then
   serving.json replaced atomically (the sidecar hot-swaps on its next poll);
3. recalibrates the serving heads' quantile scales every `calib_every` new finished requests on
   the latest `calib_window` ones that the serving head never trained on (finished after its
   training snapshot, outside the test slice), so p90 coverage follows drift;
4. writes state.json: counts per split, serving metrics, promotions, rejected candidates.

Splits come from each request's split group (split.py), never from samples.
"""
from __future__ import annotations

import fcntl
import logging
import os
import pathlib
import shutil
import signal
import time

import numpy as np

from lenpred.sidecar.learn.config import LearnConfig
from lenpred.sidecar.learn.store import ModelStore

log = logging.getLogger("lenpred.sidecar.learn")
HISTORY = 20


def split_rows(tr, cfg: LearnConfig) -> dict[str, np.ndarray]:
    from lenpred.train.data import request_rows, split_by_prompt

    sp = split_by_prompt(tr.split_keys, cfg.split_seed, cfg.split_frac)
    return {k: request_rows(tr, v) for k, v in sp.items()}


def prefill_scores(head, tr, rows) -> dict:
    """MAE of the point estimate and p90 coverage (both clipped to each request's cap)."""
    from lenpred.train import models
    from lenpred.train.metrics import scores

    if len(rows) == 0:
        return {"n": 0, "mae": float("nan"), "p90_coverage": float("nan")}
    o = models.head_predict(head, tr.last[tr.req_prompt[rows]].astype(np.float32))
    cap = tr.cap[rows]
    s = scores(tr.length[rows], o["point"], np.minimum(o["p90"], cap), cap, tr.capped[rows])
    s["p50_mae"] = scores(tr.length[rows], o["p50"], None, cap)["mae"]
    return s


def plp_scores(head, tr, rows, tokens=(0, 8, 16, 32, 64, 128)) -> dict:
    from lenpred.train import models
    from lenpred.train.evaluate import plp_rows

    X, y, step, reqs, bucket = plp_rows(tr, rows, steps=[t for t in tokens if t > 0], prompt=head.meta.prompt_feature)
    if len(y) == 0:
        return {}
    o = models.head_predict(head, X)
    rem_cap = tr.cap[reqs] - step
    out = {}
    for t in tokens:
        m = bucket == t
        if m.any():
            out[str(t)] = {"n": int(m.sum()), "mae": float(np.abs(np.minimum(o["point"][m], rem_cap[m]) - y[m]).mean())}
    return out


def _scales(y, raw50, raw90) -> dict:
    from lenpred.train.metrics import calibrate_scale

    return {"p50_scale": calibrate_scale(y, raw50, 0.5), "p90_scale": calibrate_scale(y, raw90, 0.9)}


class ModelLearner:
    """State of one model's learning loop (lives in the learner process)."""

    def __init__(self, store: ModelStore, cfg: LearnConfig):
        self.st, self.cfg = store, cfg
        self.state = store.read("state.json") or {}
        self.state.setdefault("promotions", [])
        self.state.setdefault("rejections", [])
        self.state.setdefault("rejected", 0)
        self.trained_at = int(self.state.get("trained_at_requests", 0))
        self.last_train_t = 0.0
        self.calib_at = 0

    # ------------------------------------------------------------------ serving heads
    def serving(self) -> dict | None:
        return self.st.read("serving.json")

    def reference_heads(self) -> dict:
        """The sidecar's own (shipped) heads for this model, when it has any: what a first learned
        candidate must beat."""
        from lenpred.sidecar.heads import load_head

        found = {}
        for root in self.cfg.reference_heads:
            for f in sorted(pathlib.Path(root).rglob("*.safetensors")):
                try:
                    h = load_head(f)
                except (ValueError, OSError):
                    continue
                m = h.meta
                if (m.model_id, m.hidden_size, m.layer) == (self.st.model_id, self.st.hidden_size, self.st.layer) \
                        and m.kind in ("last", "plp"):
                    found[m.kind] = h
        return found if "last" in found else {}

    def serving_heads(self) -> dict:
        from lenpred.sidecar.heads import load_head

        sv = self.serving()
        if not sv:
            return self.reference_heads()
        d = self.st.heads / sv["version"]
        heads = {k: load_head(d / f"{k}.safetensors") for k in ("last", "plp") if (d / f"{k}.safetensors").exists()}
        for k, h in heads.items():  # the sidecar serves the live calibration, so evaluate with it
            if k in sv.get("calibration", {}):
                h.meta.calibration = {**h.meta.calibration, **sv["calibration"][k]}
        return heads

    # ------------------------------------------------------------------ one step
    def step(self) -> str:
        """Look at the store once; train/promote/recalibrate when due. Returns what happened."""
        n = self.st.n_requests()
        self.state["requests"] = n
        sv = self.serving()
        due = (n >= self.cfg.min_finished and (
            sv is None and n - self.trained_at >= min(self.cfg.retrain_every, self.cfg.min_finished)
            or n - self.trained_at >= self.cfg.retrain_every
            or (n > self.trained_at and time.time() - self.last_train_t > self.cfg.retrain_interval_s)))
        what = "idle"
        if due:
            what = self.train_and_maybe_promote()
        elif sv is not None and n - self.calib_at >= self.cfg.calib_every:
            what = self.recalibrate()
        self.state["updated"] = time.time()
        self.st.write("state.json", self.state)
        return what

    def load(self):
        from lenpred.train.data import load

        return load([str(self.st.segments)])

    def train_and_maybe_promote(self) -> str:
        from lenpred.train.train import fit_served

        t0 = time.time()
        tr = self.load()
        n = len(tr.length)
        R = split_rows(tr, self.cfg)
        self.state["by_split"] = {k: int(len(v)) for k, v in R.items()}
        self.trained_at = self.st.n_requests()
        self.state["trained_at_requests"] = self.trained_at
        self.last_train_t = time.time()
        if min(len(R["train"]), len(R["val"]), len(R["test"])) < 10:
            return "too few requests per split"
        cap = int(tr.cap.max())
        version = f"online-{n}-{tr.data_hash[:8]}"
        snapshot = float(tr.finish_ts.max()) if tr.finish_ts is not None else time.time()
        cand = fit_served(tr, R, version=version, cap=cap, epochs=self.cfg.epochs, plp_epochs=self.cfg.plp_epochs,
                          trained={"online": True, "requests": n, "snapshot_ts": snapshot,
                                   "split": "prompt-token split groups (lenpred.sidecar.learn.split)"},
                          log=lambda *_: None)
        cs = prefill_scores(cand["last"], tr, R["test"])
        cs["plp_mae_by_tokens"] = plp_scores(cand["plp"], tr, R["test"])
        serving = self.serving_heads()
        if serving.get("last") is not None:
            ref_name = f"serving {serving['last'].meta.version}"
            ss = prefill_scores(serving["last"], tr, R["test"])
            ref_mae = ss["mae"]
        else:
            ref_name = "train median"
            med = float(np.median(tr.length[R["train"]]))
            ref_mae = float(np.abs(np.minimum(med, tr.cap[R["test"]]) - tr.length[R["test"]]).mean())
            ss = {"mae": ref_mae}
        lo, hi = self.cfg.coverage_band
        cov = cs["p90_coverage"]
        ok = cs["mae"] < ref_mae and lo <= cov <= hi
        rec = {"version": version, "ts": time.time(), "requests": n, "test_n": int(len(R["test"])),
               "candidate_mae": cs["mae"], "candidate_p90_coverage": cov, "reference": ref_name,
               "reference_mae": ref_mae, "train_s": round(time.time() - t0, 1)}
        if not ok:
            why = []
            if not cs["mae"] < ref_mae:
                why.append(f"MAE {cs['mae']:.1f} not below {ref_name} {ref_mae:.1f}")
            if not lo <= cov <= hi:
                why.append(f"p90 coverage {cov:.3f} outside [{lo}, {hi}]")
            rec["reason"] = "; ".join(why)
            self.state["rejected"] += 1
            self.state["rejections"] = (self.state["rejections"] + [rec])[-HISTORY:]
            log.info("candidate %s rejected: %s", version, rec["reason"])
            return "rejected"
        self.promote(cand, version, rec, cs)
        self.calib_at = self.st.n_requests()
        return "promoted"

    def promote(self, heads: dict, version: str, rec: dict, scores: dict) -> None:
        from lenpred.sidecar.heads import save_head

        d = self.st.heads / version
        tmp = self.st.heads / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k, h in heads.items():
            h.meta.metrics = scores if k == "last" else {"mae_by_tokens": scores.get("plp_mae_by_tokens", {})}
            save_head(h, tmp / f"{k}.safetensors")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        self.st.write("serving.json", {
            "version": version, "promoted": time.time(), "calibration_seq": 0,
            "calibration": {k: dict(h.meta.calibration) for k, h in heads.items()},
            "snapshot_ts": heads["last"].meta.trained.get("snapshot_ts", time.time()),
            "metrics": {"test_mae": scores["mae"], "test_p90_coverage": scores["p90_coverage"],
                        "test_n": scores["n"]}})
        self.state["serving"] = {"version": version, "test_mae": scores["mae"],
                                 "test_p90_coverage": scores["p90_coverage"]}
        self.state["last_promotion"] = time.time()
        self.state["promotions"] = (self.state["promotions"] + [rec])[-HISTORY:]
        for old in sorted(p for p in self.st.heads.iterdir() if p.is_dir() and p.name != version)[:-2]:
            shutil.rmtree(old, ignore_errors=True)  # keep the previous two for rollback
        log.info("promoted %s (test MAE %.1f, p90 coverage %.3f)", version, scores["mae"], scores["p90_coverage"])

    def recalibrate(self) -> str:
        """Scale p50/p90 of the serving heads to the newest requests they never trained on."""
        from lenpred.train import models
        from lenpred.train.evaluate import plp_rows

        sv = self.serving()
        heads = self.serving_heads()
        tr = self.load()
        self.calib_at = self.st.n_requests()
        R = split_rows(tr, self.cfg)
        fresh = np.concatenate([R["train"], R["val"]])
        if tr.finish_ts is not None:
            fresh = fresh[tr.finish_ts[fresh] > sv.get("snapshot_ts", 0)]
            fresh = fresh[np.argsort(tr.finish_ts[fresh])][-self.cfg.calib_window:]
        if len(fresh) < 20:
            return "idle"
        cal = dict(sv.get("calibration", {}))
        if "last" in heads:
            raw = models.head_raw(heads["last"], tr.last[tr.req_prompt[fresh]].astype(np.float32))
            y = tr.length[fresh].astype(np.float64)
            cal["last"] = {**cal.get("last", {}), **_scales(y, raw["p50"], raw["p90"]), "n": int(len(fresh))}
        if "plp" in heads:
            X, y, *_ = plp_rows(tr, fresh, prompt=heads["plp"].meta.prompt_feature)
            raw = models.head_raw(heads["plp"], X)
            cal["plp"] = {**cal.get("plp", {}), **_scales(y, raw["p50"], raw["p90"]), "n": int(len(y))}
        sv["calibration"] = cal
        sv["calibration_seq"] = int(sv.get("calibration_seq", 0)) + 1
        sv["calibrated"] = time.time()
        if self.serving() and self.serving()["version"] == sv["version"]:  # not replaced meanwhile
            self.st.write("serving.json", sv)
        self.state["calibration"] = {"seq": sv["calibration_seq"], "n": int(len(fresh)), "scales": cal}
        return "recalibrated"


def run(cfg: LearnConfig, *, once: bool = False, stop_after_s: float | None = None) -> int:
    """The learner process loop. SIGTERM ends it between steps. One learner per store: several
    sidecar (ingest) processes may each start one; the others wait on the store's lock."""
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    import torch

    torch.set_num_threads(cfg.threads)
    stopping = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(flag=True))
    learners: dict[str, ModelLearner] = {}
    t_end = time.time() + stop_after_s if stop_after_s else None
    pathlib.Path(cfg.dir).mkdir(parents=True, exist_ok=True)
    lock = open(pathlib.Path(cfg.dir) / "learner.lock", "w")
    while not stopping["flag"]:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if once:
                return 0
            time.sleep(max(cfg.poll_s, 2.0))
    while not stopping["flag"]:
        for st in ModelStore.all(cfg.dir):
            if not st.enabled():
                continue
            ml = learners.setdefault(st.dir.name, ModelLearner(st, cfg))
            try:
                what = ml.step()
            except Exception:  # one model's failure must not stop the others; it is logged and retried
                log.exception("learner step failed for %s", st.model_id)
                ml.state["last_error"] = time.time()
                st.write("state.json", ml.state)
                what = "error"
            if what != "idle":
                log.info("%s: %s", st.model_id, what)
        if once or (t_end and time.time() > t_end):
            break
        time.sleep(cfg.poll_s)
    return 0

"""`lenpred bench learn --data DIR --json OUT`: online learning, replayed through a real sidecar.

Collected traces (`lenpred collect-sglang` shards) are fed, in the order the tap reported them
finished, through a REAL sidecar process (real gRPC Ingest stream, real Redis, online learning on,
no heads for the model: a cold start) exactly as a tap sends them: each message carries the prefill
rows of newly admitted requests, the decode rows of the previous group and the finished events of
the group before that. The sidecar records, its learner process trains, promotes and recalibrates,
and the sidecar hot-swaps. Every `--eval-every` finished requests the served head is scored on the
held-out test requests (the test slice of the learner's own split, via real Predict calls: MAE of
the mean, p90 coverage, the head version that answered). Next to it, the offline head: the same
training code (`fit_served`) on the whole trace set's train/val slices, scored on the same test
requests.

`--sync` (default) pauses the feed at every retrain point until the learner has trained on what was
fed and the sidecar serves its verdict, so the curve is "learning as fast as data arrives", not a
race between the feed and a CPU. `--throughput-seconds S` also measures Ingest rows/s with learning
off and on (same traffic, same run, alternating, two rounds each).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import threading
import time

import grpc
import numpy as np
import torch

from lenpred.bench.report import environment, write
from lenpred.contract import wire
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc
from lenpred.harness.redisproc import RedisServer, free_port
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.sidecar.learn.config import LearnConfig
from lenpred.sidecar.learn.split import split_group
from lenpred.sidecar.learn.store import ModelStore


# ------------------------------------------------------------------------------ traffic
class Replay:
    """Requests of a trace set in arrival order, turned into the messages a tap would send."""

    def __init__(self, tr, group: int = 16, limit: int | None = None):
        self.tr = tr
        order = np.argsort(tr.finish_seq, kind="stable") if tr.finish_seq is not None and (tr.finish_seq >= 0).all() \
            else np.arange(len(tr.length))
        self.order = order[:limit] if limit else order
        self.group = group
        self.dec: dict[int, list[int]] = {}
        for j, r in enumerate(tr.dec_req):
            self.dec.setdefault(int(r), []).append(j)
        self.head = pb.HeadSelector(model_id=tr.model_id, hidden_size=tr.hidden_size, layer=-1)

    def rid(self, r: int) -> str:
        return f"r{int(r)}"

    def messages(self, start: int = 0, stop: int | None = None):
        """(finished_so_far, IngestBatch) for requests order[start:stop], pipelined by groups."""
        tr = self.tr
        idx = self.order[start:stop]
        groups = [idx[s:s + self.group] for s in range(0, len(idx), self.group)]
        done = start
        for g in range(len(groups) + 2):
            b = pb.IngestBatch(head=self.head)
            if g < len(groups):
                rs = groups[g]
                p = tr.req_prompt[rs]
                b.prefill.rids.extend(self.rid(r) for r in rs)
                b.prefill.prompt_tokens.extend(int(x) for x in tr.prompt_tokens[p])
                b.prefill.max_new_tokens.extend(int(x) for x in tr.cap[rs])
                b.prefill.last_vectors.CopyFrom(wire.encode(tr.last[p], torch.float16))
                if tr.pooled is not None:
                    b.prefill.vectors.CopyFrom(wire.encode(tr.pooled[p], torch.float16))
            if 0 <= g - 1 < len(groups):
                js = [j for r in groups[g - 1] for j in self.dec.get(int(r), [])]
                if js:
                    b.decode.rids.extend(self.rid(tr.dec_req[j]) for j in js)
                    b.decode.steps.extend(int(tr.dec_step[j]) for j in js)
                    b.decode.vectors.CopyFrom(wire.encode(tr.dec_vec[js], torch.float16))
            if 0 <= g - 2 < len(groups):
                for r in groups[g - 2]:
                    b.finished.add(rid=self.rid(r), output_tokens=int(tr.length[r]), prompt_tokens=int(tr.prompt_tokens[tr.req_prompt[r]]),
                                   truncated=bool(tr.capped[r]), max_new_tokens=int(tr.cap[r]))
                done += len(groups[g - 2])
            yield done, b


def stream(target: str, msgs, window: int = 8, timeout: float = 3600) -> dict:
    """Send msgs over one Ingest stream with up to `window` unacked; returns ack totals."""
    sem = threading.Semaphore(window)
    tot = {"accepted": 0, "rejected": 0, "messages": 0, "errors": []}

    def gen():
        for i, b in enumerate(msgs):
            sem.acquire()
            b.seq = i + 1
            yield b

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        for ack in pb_grpc.LengthPredictorStub(ch).Ingest(gen(), timeout=timeout):
            tot["accepted"] += ack.accepted
            tot["rejected"] += ack.rejected
            tot["messages"] += 1
            if ack.code and len(tot["errors"]) < 5:
                tot["errors"].append(ack.message)
            sem.release()
    return tot


# ------------------------------------------------------------------------------ scoring
def served_scores(target: str, tr, rows: np.ndarray) -> dict:
    """The served prefill head on held-out requests, through real Predict calls."""
    p = tr.req_prompt[rows]
    head = pb.HeadSelector(model_id=tr.model_id, hidden_size=tr.hidden_size, layer=-1)
    means, p90s, vers = [], [], set()
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                ("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.LengthPredictorStub(ch)
        for s in range(0, len(p), 2048):
            try:
                r = stub.Predict(pb.PredictRequest(head=head, prompt_vectors=wire.encode(tr.last[p[s:s + 2048]], torch.float16),
                                                   prompt_feature="last"), timeout=60)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # no head yet (cold start)
                    return {"mae": None, "p90_coverage": None, "head_version": None}
                raise
            means += [x.mean for x in r.predictions]
            p90s += [x.p90 for x in r.predictions]
            vers |= {x.head_version for x in r.predictions}
    y, cap = tr.length[rows].astype(np.float64), tr.cap[rows]
    mean, p90 = np.minimum(np.array(means), cap), np.minimum(np.array(p90s), cap)
    return {"mae": float(np.abs(mean - y).mean()), "p90_coverage": float((y <= p90 + 1e-6).mean()),
            "head_version": ",".join(sorted(vers))}


def offline_head(tr, cfg: LearnConfig, R: dict) -> dict:
    from lenpred.sidecar.learn.learner import plp_scores, prefill_scores
    from lenpred.train.train import fit_served

    t0 = time.time()
    heads = fit_served(tr, R, version="offline", cap=int(tr.cap.max()), epochs=cfg.epochs, plp_epochs=cfg.plp_epochs,
                       log=lambda *_: None)
    s = prefill_scores(heads["last"], tr, R["test"])
    return {"mae": s["mae"], "p90_coverage": s["p90_coverage"], "p50_mae": s["p50_mae"], "n": s["n"],
            "plp_mae_by_tokens": plp_scores(heads["plp"], tr, R["test"]), "train_s": round(time.time() - t0, 1),
            "heads": heads}


def scrape(url: str, names: tuple[str, ...]) -> dict:
    import httpx

    out = {}
    try:
        for line in httpx.get(url, timeout=5).text.splitlines():
            for n in names:
                if line.startswith(n + "{") or line.startswith(n + " "):
                    out[n] = float(line.rsplit(" ", 1)[1])
    except httpx.HTTPError:
        pass
    return out


# ------------------------------------------------------------------------------ sidecar
class Sidecar:
    def __init__(self, work: pathlib.Path, name: str, heads: str, redis_url: str, learn: dict | None, threads: int):
        for attempt in range(3):  # a free port can be taken by someone else before the sidecar binds it
            self.port, self.mport = free_port(), free_port()
            args = ["sidecar", "--port", str(self.port), "--metrics-port", str(self.mport), "--heads", heads,
                    "--device", "cpu", "--threads", str(threads), "--redis-url", redis_url,
                    "--max-message-bytes", str(32 << 20), "--log-level", "WARNING"]
            if learn:
                args += ["--learn-dir", learn["dir"], "--learn-config",
                         json.dumps({k: v for k, v in learn.items() if k != "dir"})]
            self.child = spawn(name, lenpred_argv(*args), work)
            self.target = f"127.0.0.1:{self.port}"
            self.metrics = f"http://127.0.0.1:{self.mport}/metrics"
            try:
                wait_grpc(self.child, self.target, 120)
                return
            except RuntimeError:
                self.child.stop()
                if attempt == 2:
                    raise

    def stop(self) -> None:
        self.child.stop()


def wait_for_learner(store: ModelStore, target: str, tr, fed: int, timeout: float) -> dict:
    """Until the learner trained on >= `fed` requests (or nothing is due) and the sidecar serves
    what serving.json names."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = store.read("state.json") or {}
        sv = store.read("serving.json") or {}
        if st.get("trained_at_requests", 0) >= fed * 0.98:
            if not sv or _served_versions(target, tr) == {sv.get("version")}:
                return st
        time.sleep(0.5)
    return store.read("state.json") or {}


def _served_versions(target: str, tr) -> set[str]:
    with grpc.insecure_channel(target) as ch:
        info = pb_grpc.LengthPredictorStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=10)
    return {h.key.version for h in info.heads if h.key.model_id == tr.model_id and h.key.hidden_size == tr.hidden_size}


def throughput(work, tr, heads_dir: str, redis_url: str, learn: dict, seconds: float, threads: int,
               n_requests: int) -> dict:
    """Ingest rows/s with learning off, recording only (the in-process hook + recorder thread, no
    learner), and on (recorder + learner process), same traffic, alternating rounds."""
    rep = Replay(tr, group=32, limit=n_requests)
    msgs = [b for _, b in rep.messages()]
    res = {"off": [], "record": [], "on": []}
    for rnd in range(2):
        for mode in ("off", "record", "on"):
            lcfg = dict(learn, dir=str(work / f"tp-{mode}-{rnd}"), spawn_learner=mode == "on") if mode != "off" else None
            sc = Sidecar(work, f"tp-{mode}-{rnd}", heads_dir, redis_url, lcfg, threads)
            try:
                rows, t0 = 0, time.time()
                while time.time() - t0 < seconds:
                    tot = stream(sc.target, iter(msgs), window=8)
                    rows += tot["accepted"] + tot["rejected"]
                res[mode].append(rows / (time.time() - t0))
            finally:
                sc.stop()
    off, on, recd = (float(np.median(res[k])) for k in ("off", "on", "record"))
    return {"rows_per_s_off": off, "rows_per_s_on": on, "ratio_on_off": on / off, "rows_per_s_record": recd,
            "ratio_record_off": recd / off, "rounds": res, "seconds_per_round": seconds,
            "cpus": os.cpu_count(),
            "note": "record = the sidecar's hook and recorder thread only; on = the same plus the learner "
                    "process training beside it (on a machine with spare cores the learner runs on its own)"}


# ------------------------------------------------------------------------------ main
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench learn", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="trace folder(s), comma-separated")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md", default=None, help="markdown (default: JSON path with .md)")
    ap.add_argument("--limit", type=int, default=None, help="replay the first N requests")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--group", type=int, default=16, help="requests admitted per tap message")
    ap.add_argument("--learn-config", default='{"min_finished": 500, "retrain_every": 500}',
                    help="JSON LearnConfig fields for the sidecar")
    ap.add_argument("--no-sync", action="store_true", help="don't wait for the learner at retrain points")
    ap.add_argument("--sync-timeout", type=float, default=900)
    ap.add_argument("--throughput-seconds", type=float, default=0, help="0 = skip the learning on/off throughput")
    ap.add_argument("--throughput-only", action="store_true", help="skip the replay, measure throughput only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lenpred.train.data import load, request_rows, split_by_prompt

    t_start = time.time()
    tr = load(a.data)
    work = pathlib.Path(a.work or tempfile.mkdtemp(prefix="lenpred-bench-learn-"))
    work.mkdir(parents=True, exist_ok=True)
    learn = {**json.loads(a.learn_config), "dir": str(work / "store"), "flush_s": 1.0}
    cfg = LearnConfig(**learn)
    # the learner's split (its split groups), applied to the whole trace set
    groups = np.array([split_group(int(tr.prompt_tokens[p]), tr.last[p], cfg.simhash_bits) for p in range(len(tr.key))])
    sp = split_by_prompt(groups, cfg.split_seed, cfg.split_frac)
    R = {k: request_rows(tr, v) for k, v in sp.items()}
    rep = Replay(tr, a.group, a.limit)
    replayed = set(rep.order.tolist())
    test = np.array([r for r in R["test"] if r in replayed]) if a.limit else R["test"]
    print(f"traces: {len(tr.length)} requests ({len(tr.key)} prompts), d={tr.hidden_size}; replaying {len(rep.order)}, "
          f"{len(test)} held-out test requests", flush=True)
    off = offline_head(tr, cfg, R)
    print(f"offline head: test MAE {off['mae']:.1f}, p90 coverage {off['p90_coverage']:.3f} ({off['train_s']}s)", flush=True)
    redis = RedisServer.start()
    try:
        return _run(a, argv, tr, work, learn, cfg, R, rep, test, off, redis, t_start)
    finally:
        redis.stop()


def _run(a, argv, tr, work, learn, cfg, R, rep, test, off, redis, t_start) -> int:
    from lenpred.sidecar.heads import save_head

    if a.throughput_only:
        hd = work / "offline-heads"
        hd.mkdir(exist_ok=True)
        for k, h in off["heads"].items():
            save_head(h, hd / f"{k}.safetensors")
        tp = throughput(work, tr, str(hd), redis.url, learn, a.throughput_seconds or 15, a.threads, min(len(rep.order), 2000))
        print(json.dumps({k: v for k, v in tp.items() if k != "rounds"}), flush=True)
        return 0

    empty = work / "no-heads"
    empty.mkdir(exist_ok=True)
    curve, t_replay = [], time.time()
    store = ModelStore(learn["dir"], tr.model_id, tr.hidden_size, -1)
    sc = Sidecar(work, "sidecar", str(empty), redis.url, learn, a.threads)
    totals = {"accepted": 0, "rejected": 0, "messages": 0}
    try:
        pos, n = 0, len(rep.order)
        while pos < n:
            stop = min(n, (pos // a.eval_every + 1) * a.eval_every)
            tot = stream(sc.target, (b for _, b in rep.messages(pos, stop)))
            for k in totals:
                totals[k] += tot[k]
            if tot["errors"]:
                print("  acks with errors:", tot["errors"][:2], flush=True)
            pos = stop
            time.sleep(cfg.flush_s + 0.5)  # the recorder writes its segment
            if not a.no_sync and (pos % cfg.retrain_every == 0 or pos == n) and pos >= cfg.min_finished:
                wait_for_learner(store, sc.target, tr, pos, a.sync_timeout)
            s = served_scores(sc.target, tr, test)
            live = scrape(sc.metrics, ("lenpred_learn_live_mae_tokens", "lenpred_learn_live_p90_coverage"))
            point = {"finished": pos, **s, "live_mae": live.get("lenpred_learn_live_mae_tokens"),
                     "live_p90_coverage": live.get("lenpred_learn_live_p90_coverage"),
                     "t_s": round(time.time() - t_replay, 1)}
            curve.append(point)
            print(f"  {pos:6d} finished: served MAE {s['mae']}, p90 cov {s['p90_coverage']}, head {s['head_version']}",
                  flush=True)
        state = store.read("state.json") or {}
    finally:
        sc.stop()
    tp = None
    if a.throughput_seconds > 0:
        hd = work / "offline-heads"
        hd.mkdir(exist_ok=True)
        for k, h in off["heads"].items():
            h.meta.model_id = tr.model_id
            save_head(h, hd / f"{k}.safetensors")
        tp = throughput(work, tr, str(hd), redis.url, learn, a.throughput_seconds, a.threads, min(n, 2000))
        print(f"throughput: learning off {tp['rows_per_s_off']:.0f} rows/s, recording {tp['rows_per_s_record']:.0f} "
              f"({tp['ratio_record_off']:.3f}x), on {tp['rows_per_s_on']:.0f} ({tp['ratio_on_off']:.3f}x)", flush=True)
    served = [c for c in curve if c["mae"] is not None]
    first = served[0]["finished"] if served else None
    end = curve[-1] if curve else {}
    at2000 = next((c for c in curve if c["finished"] >= 2000 and c["mae"] is not None), None)
    covs = [c["p90_coverage"] for c in served]
    result = {
        "benchmark": "learn", "command": "lenpred bench learn " + " ".join(argv), "data": a.data,
        "data_hash": tr.data_hash, "model_id": tr.model_id, "hidden_size": tr.hidden_size,
        "offline_mae": off["mae"], "offline_p90_coverage": off["p90_coverage"], "offline_p50_mae": off["p50_mae"],
        "offline_plp_mae_by_tokens": off["plp_mae_by_tokens"],
        "online_mae": end.get("mae"), "p90_coverage": end.get("p90_coverage"), "finished": int(len(rep.order)),
        "test_requests": int(len(test)), "first_served_at": first,
        "online_mae_at_2000": at2000["mae"] if at2000 else None,
        "p90_coverage_after_first_promotion": {"min": min(covs), "max": max(covs)} if covs else None,
        "curve": curve, "promotions": state.get("promotions", []), "rejected": state.get("rejected", 0),
        "rejections": state.get("rejections", []), "calibration": state.get("calibration"),
        "ingest": totals, "throughput": tp, "learn_config": cfg.model_dump(), "sync": not a.no_sync,
        "wall_s": round(time.time() - t_start, 1), "environment": environment(),
        "split": "learner's split groups (prompt tokens; lenpred.sidecar.learn.split) over the whole trace set",
    }
    md = markdown(result)
    write(result, a.json, a.md or str(pathlib.Path(a.json).with_suffix(".md")), md)
    plot(result, pathlib.Path(a.json).with_suffix(".png"))
    return 0


def markdown(r: dict) -> str:
    L = [f"## Online learning replay ({r['model_id']}, {r['finished']} requests, {r['test_requests']} held-out)", "",
         f"Command: `{r['command']}`", "",
         f"Offline head (same code, all train prompts): MAE **{r['offline_mae']:.1f}**, p90 coverage {r['offline_p90_coverage']:.3f}.",
         f"Online head at the end: MAE **{r['online_mae'] if r['online_mae'] is None else round(r['online_mae'], 1)}**, "
         f"p90 coverage {r['p90_coverage']}; first served after {r['first_served_at']} finished requests; "
         f"{len(r['promotions'])} promotions, {r['rejected']} rejected candidates.", "",
         "| finished | served MAE | p90 cov. | live MAE | live p90 cov. | head version |", "|---|---|---|---|---|---|"]
    f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for c in r["curve"]:
        L.append(f"| {c['finished']} | {f(c['mae'])} | {f(c['p90_coverage'], 3)} | {f(c['live_mae'])} | "
                 f"{f(c['live_p90_coverage'], 3)} | {c['head_version'] or '– (router fallback)'} |")
    if r.get("throughput"):
        t = r["throughput"]
        L += ["", f"Ingest throughput, same traffic ({t['cpus']} CPUs): learning off {t['rows_per_s_off']:.0f} rows/s; "
                  f"recording (hook + recorder thread) {t['rows_per_s_record']:.0f} rows/s ({t['ratio_record_off']:.3f}×); "
                  f"recording + learner process {t['rows_per_s_on']:.0f} rows/s ({t['ratio_on_off']:.3f}×)."]
    return "\n".join(L) + "\n"


def plot(r: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    pts = [c for c in r["curve"] if c["mae"] is not None]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([c["finished"] for c in pts], [c["mae"] for c in pts], "o-", label="online (served head)")
    ax[0].axhline(r["offline_mae"], color="k", ls="--", label="offline head")
    ax[0].set_xlabel("finished requests")
    ax[0].set_ylabel("held-out MAE (tokens)")
    ax[0].legend()
    ax[1].plot([c["finished"] for c in pts], [c["p90_coverage"] for c in pts], "o-")
    ax[1].axhspan(0.85, 0.95, color="g", alpha=0.15)
    ax[1].set_xlabel("finished requests")
    ax[1].set_ylabel("p90 coverage (held-out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""`lenpred bench tapcheck`: is what the tap ships under CUDA graphs the same as without them?

Two real SGLang servers with the real model (default: the shipped SmolLM2) and the tap (entropy
pool on, decode state every step, float32 on the wire) start side by side: one as configured (CUDA
graphs on a GPU), one with `--disable-cuda-graph`. Both get the same greedy requests, one at a
time, then the same prompts again (radix-cache hits: the PrefixStore's block restore runs), then a
concurrent burst. The check: per request, the pooled prompt vector, the last-token vector and every
decode vector up to the first token where the two servers' greedy outputs diverge agree (cosine),
every request's `finished` row matches the server's own token count, no tap errors, no drops.
A tap reading a CUDA-graph output buffer after the next replay overwrote it would show up as decode
vectors that disagree (or as adjacent decode vectors that are near-copies).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import pathlib
import sys
import time

import numpy as np

from lenpred.bench.engine import launch_server, post, resolve_target, stop_all, tap_log
from lenpred.bench.report import environment, write
from lenpred.harness.engine import wait_healthy
from lenpred.harness.recorder import RecordingSidecar

# a shared context long enough (~170 tokens) that a repeated prompt's cached prefix spans several
# PrefixStore blocks, followed by four different questions
CONTEXT = ("You are a careful assistant for a team that runs a fleet of language-model servers. The team "
           "schedules requests across replicas, watches memory on every accelerator, and wants answers that "
           "are short, correct and practical. When a question is about mathematics, show the steps; when it "
           "is about code, give a small example; when it is about writing, keep to the requested form. "
           "Never invent facts; say when you are unsure. The servers are busy, so long answers cost other "
           "users time, and the team measures both the quality of each answer and how long it takes. ")
PROMPTS = [CONTEXT + q for q in (
    "Question: what is the capital of France, and why did it become the capital?",
    "Question: write a haiku about the sea at night.",
    "Question: list three prime numbers and explain why they are prime.",
    "Question: explain what a hash table is in one paragraph, then give a short example in Python.",
)]
TAP_ENV = {"SGLANG_PLUGINS": "lenpred_tap", "LENPRED_TAP_EVERY": "1", "LENPRED_TAP_DTYPE": "float32"}
FLAGS = ("--return-hidden-states-mode", "full")


def cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)


def drive(url: str, tokens: int, burst: int, timeout: float) -> dict[str, dict]:
    out = {}
    gen = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    for rnd in ("a", "b"):  # round b repeats every prompt: the radix cache serves all but one token
        for i, p in enumerate(PROMPTS):
            rid = f"seq{rnd}-{i}"
            out[rid] = post(url + "/generate", {"rid": rid, "text": p, "sampling_params": gen}, timeout)

    def one(i):
        rid = f"burst-{i}"
        return rid, post(url + "/generate", {"rid": rid, "text": f"Tell me a story about robot number {i}.",
                                             "sampling_params": gen}, timeout)
    with cf.ThreadPoolExecutor(max(1, burst)) as ex:
        out.update(dict(ex.map(one, range(burst))))
    return out


def collect(rec: RecordingSidecar, answers: dict[str, dict]) -> dict:
    rec.wait_for(lambda r: set(answers) <= set(r.finished()), timeout=60)
    fin, pre, last, dec = rec.finished(), rec.prefill(), rec.prefill_last(), rec.decode()
    return {"fin": fin, "pre": {k: v[0].numpy() for k, v in pre.items()},
            "last": {k: v.numpy() for k, v in last.items()},
            "dec": {k: dict((s, v.numpy()) for s, v in rows) for k, rows in dec.items()},
            "ids": {k: list(a.get("output_ids") or []) for k, a in answers.items()},
            "cached": {k: int(a["meta_info"].get("cached_tokens", 0)) for k, a in answers.items()},
            "len": {k: int(a["meta_info"]["completion_tokens"]) for k, a in answers.items()}}


def check(a: dict, b: dict) -> dict:
    rows, worst = [], {"pooled": 1.0, "last": 1.0, "decode": 1.0}
    problems = []
    for side, x in (("graph", a), ("eager", b)):
        for rid, n in x["len"].items():
            f = x["fin"].get(rid)
            if f is None or f.output_tokens != n:
                problems.append(f"{side} {rid}: finished row {None if f is None else f.output_tokens} != {n}")
            if rid not in x["last"] or rid not in x["pre"]:
                problems.append(f"{side} {rid}: no prefill vectors")
    dupes = 0
    for rid in sorted(a["len"]):
        ia, ib = a["ids"].get(rid, []), b["ids"].get(rid, [])
        n = min(len(ia), len(ib))
        same = next((i for i in range(n) if ia[i] != ib[i]), n)
        r = {"rid": rid, "identical_leading_tokens": same}
        # a radix-cache hit on one server and not the other (the burst's requests share a prefix and
        # arrive in a different order) pools different rows on purpose: compare pools only when
        # both servers cached the same number of tokens
        same_cache = a["cached"].get(rid) == b["cached"].get(rid)
        if not same_cache:
            r["pooled_skipped"] = f"cached tokens {a['cached'].get(rid)} vs {b['cached'].get(rid)}"
        for key in ("pooled", "last"):
            src = "pre" if key == "pooled" else "last"
            if rid in a[src] and rid in b[src] and (same_cache or key == "last"):
                r[f"{key}_cos"] = round(float(cos(a[src][rid], b[src][rid])), 6)
                worst[key] = min(worst[key], r[f"{key}_cos"])
        da, db = a["dec"].get(rid, {}), b["dec"].get(rid, {})
        steps = sorted(s for s in set(da) & set(db) if s <= same)
        if steps:
            c = cos(np.stack([da[s] for s in steps]), np.stack([db[s] for s in steps]))
            r["decode_steps_compared"], r["decode_min_cos"] = len(steps), round(float(c.min()), 6)
            worst["decode"] = min(worst["decode"], r["decode_min_cos"])
        xs = np.stack([da[s] for s in sorted(da)]) if len(da) > 1 else None
        if xs is not None:
            dupes += int((cos(xs[1:], xs[:-1]) > 0.9999).sum())
        rows.append(r)
    # the restored pool of a repeated prompt, next to the same prompt computed whole
    restored = [round(float(cos(a["pre"][f"seqb-{i}"], a["pre"][f"seqa-{i}"])), 6)
                for i in range(len(PROMPTS)) if f"seqa-{i}" in a["pre"] and f"seqb-{i}" in a["pre"]]
    return {"requests": rows, "worst_cos": worst, "adjacent_duplicate_decode_vectors": dupes,
            "restored_vs_whole_cos": restored, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench tapcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: the shipped SmolLM2 checkpoint)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=48, help="greedy output tokens per request")
    ap.add_argument("--burst", type=int, default=32, help="concurrent requests after the sequential ones")
    ap.add_argument("--mem-fraction", type=float, default=0.2)
    ap.add_argument("--min-cos", type=float, default=0.99, help="exit 1 below this")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("server_args", nargs="*", help="after `--`: extra sglang.launch_server arguments")
    a = ap.parse_args(argv)
    resolve_target(a)
    log_dir = pathlib.Path(a.log_dir or (pathlib.Path(a.json).parent if a.json else "/tmp/lenpred-tapcheck"))
    log_dir.mkdir(parents=True, exist_ok=True)
    recs = {k: RecordingSidecar() for k in ("graph", "eager")}
    extra = {"graph": [], "eager": ["--disable-cuda-graph"] if a.device == "cuda" else []}
    engines = {}
    try:
        for k, rec in recs.items():
            engines[k] = launch_server(k, TAP_ENV, FLAGS, a, rec.target, log_dir, [*a.server_args, *extra[k]])
        for eng in engines.values():
            wait_healthy(eng, a.timeout)
        t0 = time.time()
        with cf.ThreadPoolExecutor(2) as ex:  # both servers at once: same work, same moment
            answers = dict(zip(engines, ex.map(lambda e: drive(e.url, a.tokens, a.burst, a.timeout),
                                               engines.values())))
        got = {k: collect(recs[k], answers[k]) for k in engines}
        res = check(got["graph"], got["eager"])
        res["seconds"] = round(time.time() - t0, 1)
        time.sleep(6)
        res["tap"] = {k: {**tap_log(e), "rows": recs[k].counts} for k, e in engines.items()}
    finally:
        stop_all(engines.values())
        for rec in recs.values():
            rec.stop()
    env = environment()
    import sglang

    env.update(sglang=sglang.__version__, device=a.device, cuda_graph=a.device == "cuda")
    errors = sum(t["tap_errors_logged"] for t in res["tap"].values())
    ok = (not res["problems"] and errors == 0 and min(res["worst_cos"].values()) >= a.min_cos)
    result = {"benchmark": "tapcheck", "ok": ok, "config": vars(a), "environment": env, **res}
    write(result, a.json, None, json.dumps({"ok": ok, "worst_cos": res["worst_cos"], "problems": res["problems"][:5],
                                            "restored_vs_whole_cos": res["restored_vs_whole_cos"],
                                            "tap_errors": errors}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

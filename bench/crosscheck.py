"""`lenpred bench crosscheck`: the same workload on real SGLang replicas and on the emulator.

The scheduling benchmark (`lenpred bench schedule`) runs on emulated engines. This command checks
the emulator against real engines at a scale this CPU can serve: R real SGLang 0.5.23 replicas
(SmolLM2-135M-Instruct, CPU, the tap loaded by entry point) behind the real router, the real
sidecar publishing real predictions to Redis, and a Poisson stream of real prompts, replayed once
per policy. Then the twin: the same policies, the same arrival times, the same prompts, each
request's true length as measured on the real engines and the prediction the real heads made for
it, against R emulator replicas with the `cpu-smollm2` cost preset. The report puts the two side by
side: the absolute calibration error, and whether the emulator gets the policies' difference right.

Greedy decoding (temperature 0) keeps each prompt's answer the same under every policy.

    lenpred bench crosscheck --replicas 2 --n 24 --rate 0.4 --json out.json --md out.md

With `--real RESULT.json` (what `lenpred bench schedule-real` wrote, with its `_raw.json` beside it)
it calibrates the emulator from those real engines instead and replays the same runs on it: the
step-cost model `a + b x decode rows + p x prefill tokens + c x KV tokens` is fitted to SGLang's own
decode step-time moments and prefill busy time (`/v1/loads`, sampled during the real runs), then
every real run is repeated against emulated replicas with the fitted costs, the same KV budget, the
same arrival times, lengths and injected predictions, the same policies and SLO.

    lenpred bench crosscheck --real docs/results/schedule_gpu.json --json c.json --md c.md
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pathlib
import random
import signal
import statistics
import sys
import tempfile
import threading
import time

import httpx
import numpy as np

from lenpred.bench import report
from lenpred.bench.real import replay as rp
from lenpred.bench.real import summary as sm
from lenpred.bench.real.workload import prompt_ids, prompt_priority
from lenpred.harness.emulator import COST_MODELS
from lenpred.harness.inject import Item
from lenpred.contract.keys import events_pattern
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc, wait_http
from lenpred.harness.redisproc import RedisServer, free_port

POLICY_DIR = pathlib.Path(__file__).resolve().parent.parent / "router" / "policies"
DEFAULT_PROMPTS = "../shared/data/sharegpt/first_turn.jsonl"
COLUMNS = ["policy", "engine", "completed", "makespan_s", "e2e_mean_s", "e2e_p90_s", "ttft_p50_s", "ttft_p90_s",
           "tpot_mean_ms", "tokens"]


def pick_prompts(path: str, n: int, seed: int, max_chars: int) -> list[dict]:
    from lenpred.train.prompts import load_prompts

    rows = [p for p in load_prompts(path, limit=4000) if len(p.text) <= max_chars]
    random.Random(seed).shuffle(rows)
    return [{"id": p.id, "prompt": p.text} for p in rows[:n]]


class EventTap:
    """Follows the events channel in a thread; keeps each rid's first prediction (step 0: the
    prefill head's, what placement and ordering can know)."""

    def __init__(self, redis_url: str, ns: str):
        import redis

        self._pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(events_pattern(ns))   # every router's channel
        self.first: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.2)
            if not msg:
                continue
            ev = json.loads(msg["data"])
            if ev.get("type") == "prediction" and ev.get("step") == 0:
                self.first.setdefault(ev["rid"], ev)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._pubsub.close()


async def replay(router: str, prompts: list[dict], offsets: list[float], args, emulated: dict | None) -> list[dict]:
    """Send each prompt at its offset (streamed, usage included); `emulated` adds each prompt's
    true length and prediction for the emulator."""
    out: list[dict] = [{} for _ in prompts]
    async with httpx.AsyncClient(base_url=router, timeout=httpx.Timeout(900)) as c:
        async def one(i: int, p: dict) -> None:
            body = {"model": "default", "messages": [{"role": "user", "content": p["prompt"]}],
                    "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if emulated is not None:
                body["custom_params"] = {"emulated_output_len": emulated[p["id"]]["true_len"],
                                         "emulated_prediction": emulated[p["id"]]["pred"], "emulated_id": p["id"]}
            t0 = time.monotonic()
            first, tokens, status, rid = None, 0, 0, None
            try:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    status, rid = r.status_code, r.headers.get("x-lenpred-rid")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content") and first is None:
                            first = time.monotonic()
                        if ev.get("usage"):
                            tokens = ev["usage"]["completion_tokens"]
            except httpx.HTTPError as e:
                out[i] = {"id": p["id"], "status": 0, "error": str(e)}
                return
            done = time.monotonic()
            out[i] = {"id": p["id"], "rid": rid, "status": status, "tokens": tokens, "sent": t0, "done": done,
                      "ttft": (first or done) - t0, "e2e": done - t0,
                      "tpot": (done - first) / max(tokens - 1, 1) if first else None}

        start = time.monotonic()
        tasks = []
        for i, (p, off) in enumerate(zip(prompts, offsets)):
            await asyncio.sleep(max(start + off - time.monotonic(), 0))
            tasks.append(asyncio.create_task(one(i, p)))
        await asyncio.gather(*tasks)
    return out


def summarize(policy: str, engine: str, rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("status") == 200]
    pct = lambda xs, q: sorted(xs)[min(int(q * len(xs)), len(xs) - 1)] if xs else None  # noqa: E731
    return {"policy": policy, "engine": engine, "completed": len(ok), "failed": len(rows) - len(ok),
            "makespan_s": (max(r["done"] for r in ok) - min(r["sent"] for r in ok)) if ok else None,
            "e2e_mean_s": statistics.fmean(r["e2e"] for r in ok) if ok else None,
            "e2e_p90_s": pct([r["e2e"] for r in ok], 0.9), "ttft_p50_s": pct([r["ttft"] for r in ok], 0.5),
            "ttft_p90_s": pct([r["ttft"] for r in ok], 0.9),
            "tpot_mean_ms": 1000 * statistics.fmean(r["tpot"] for r in ok if r["tpot"] is not None) if ok else None,
            "tokens": sum(r["tokens"] for r in ok)}


def run_router(policy: str, backends: list[str], redis_url: str, ns: str, log_dir: pathlib.Path, name: str):
    port = free_port()
    child = spawn(name, lenpred_argv("router", "serve", "--host", "127.0.0.1", "--port", str(port),
                                     "--backends", ",".join(backends), "--policy", policy,
                                     "--redis-url", redis_url, "--namespace", ns), log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_http(child, url + "/ready", 60)
    time.sleep(1.0)   # the first load poll and the event subscription
    return child, url


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--real" in argv:
        return real_main(argv)
    p = argparse.ArgumentParser(prog="lenpred bench crosscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--rate", type=float, default=0.4, help="Poisson arrivals, req/s (wall)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompts", default=DEFAULT_PROMPTS)
    p.add_argument("--max-prompt-chars", type=int, default=1500)
    p.add_argument("--policy", action="append", default=[],
                   help="policy files (default: baseline-round-robin.yaml and predicted.yaml)")
    p.add_argument("--cost-model", default="cpu-smollm2", choices=sorted(COST_MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    policies = a.policy or [str(POLICY_DIR / "baseline-round-robin.yaml"), str(POLICY_DIR / "predicted.yaml")]
    from lenpred.train.prompts import PromptFileError

    try:
        prompts = pick_prompts(a.prompts, a.n, a.seed, a.max_prompt_chars)
    except PromptFileError as e:
        p.error(str(e))
    if len(prompts) < a.n:
        p.error(f"{a.prompts}: only {len(prompts)} prompts of <= {a.max_prompt_chars} characters, {a.n} asked for")
    rng = random.Random(a.seed)
    offsets, t = [], 0.0
    for _ in prompts:
        offsets.append(t)
        t += rng.expovariate(a.rate)
    log_dir = pathlib.Path(a.log_dir or tempfile.mkdtemp(prefix="lenpred-crosscheck-"))
    from lenpred.harness.engine import start_engine

    results: list[dict] = []
    per_request: dict[str, dict] = {}
    truth: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        redis = RedisServer.start()
        stack.callback(redis.stop)
        sc_port = free_port()
        sidecar = spawn("sidecar", lenpred_argv("sidecar", "--port", str(sc_port), "--redis-url", redis.url,
                                                "--namespace", "real", "--device", "cpu"), log_dir)
        stack.callback(sidecar.stop)
        wait_grpc(sidecar, f"127.0.0.1:{sc_port}", 60)
        engines = []
        for i in range(a.replicas):
            print(f"[crosscheck] starting real SGLang replica {i} (CPU, ~70 s)...", flush=True)
            eng = start_engine(free_port(), f"127.0.0.1:{sc_port}", log_path=log_dir / f"engine-{i}.log")
            stack.callback(eng.stop)
            engines.append(eng)
        # Real engines: one router per policy, the same arrivals.
        for k, pol in enumerate(policies):
            name = pathlib.Path(pol).stem
            events = EventTap(redis.url, "real")
            router, url = run_router(pol, [e.url for e in engines], redis.url, "real", log_dir, f"router-real-{k}")
            print(f"[crosscheck] real engines, policy {name}: {len(prompts)} requests...", flush=True)
            rows = asyncio.run(replay(url, prompts, offsets, a, None))
            router.stop()
            time.sleep(1.0)
            events.close()
            for r in rows:
                first = events.first.get(r.get("rid") or "")
                r["pred"] = first["p50"] if first else None
                if r.get("status") == 200:
                    t = truth.setdefault(r["id"], {"true_len": r["tokens"], "pred": r["pred"]})
                    if t["pred"] is None:
                        t["pred"] = r["pred"]
            per_request[f"real/{name}"] = rows
            results.append(summarize(name, "real", rows))
            print(f"[crosscheck]   {json.dumps(results[-1])}", flush=True)
    # The twin: emulated replicas, each prompt's measured length and real prediction.
    ok_prompts = [pr for pr in prompts if pr["id"] in truth]
    ok_offsets = [off for pr, off in zip(prompts, offsets) if pr["id"] in truth]
    for pr in ok_prompts:
        if truth[pr["id"]]["pred"] is None:   # no prediction arrived: the emulator draws one
            truth[pr["id"]]["pred"] = float(truth[pr["id"]]["true_len"])
    with contextlib.ExitStack() as stack:
        redis = RedisServer.start()
        stack.callback(redis.stop)
        for k, pol in enumerate(policies):
            name = pathlib.Path(pol).stem
            ports = [free_port() for _ in range(a.replicas)]
            emu = spawn(f"emulator-{k}", [sys.executable, "-m", "lenpred.harness.emulator", "--ports",
                                          ",".join(map(str, ports)), "--cost-model", a.cost_model,
                                          "--redis-url", redis.url, "--namespace", f"emu{k}", "--plp-every", "16",
                                          "--model", "default"], log_dir)
            try:
                for port in ports:
                    wait_http(emu, f"http://127.0.0.1:{port}/health", 30)
                router, url = run_router(pol, [f"http://127.0.0.1:{x}" for x in ports], redis.url, f"emu{k}",
                                         log_dir, f"router-emu-{k}")
                print(f"[crosscheck] emulated engines, policy {name}...", flush=True)
                rows = asyncio.run(replay(url, ok_prompts, ok_offsets, a, truth))
                router.stop()
            finally:
                emu.stop()
            per_request[f"emulated/{name}"] = rows
            results.append(summarize(name, f"emulated ({a.cost_model})", rows))
            print(f"[crosscheck]   {json.dumps(results[-1])}", flush=True)
    comparison = compare(results, policies)
    # the router caps every estimate at the request's max_tokens: score what it used
    preds = [(min(v["pred"], a.max_tokens), v["true_len"]) for v in truth.values() if v["pred"] is not None]
    result = {"args": vars(a), "policies": [os.path.relpath(x) for x in policies], "results": results,
              "comparison": comparison, "prompts": len(prompts), "measured": len(truth),
              "prediction_mae": statistics.fmean(abs(p - t) for p, t in preds) if preds else None,
              "cost_model": COST_MODELS[a.cost_model], "environment": report.environment(),
              "command": "lenpred bench crosscheck " + " ".join(argv if argv is not None else sys.argv[1:]),
              "per_request": per_request}
    report.write(result, a.json, a.md, render(result))
    return 0


def compare(results: list[dict], policies: list[str]) -> dict:
    """Emulated / real for each metric and policy, and each policy's effect (its metric over the
    first policy's) on both engines."""
    by = {(r["policy"], r["engine"].split(" ")[0]): r for r in results}
    names = [pathlib.Path(x).stem for x in policies]
    out: dict = {"emulated_over_real": {}, "effect_vs_first": {}}
    for n in names:
        real, emu = by.get((n, "real")), by.get((n, "emulated"))
        if real and emu:
            out["emulated_over_real"][n] = {m: emu[m] / real[m] for m in ("makespan_s", "e2e_mean_s", "ttft_p50_s",
                                                                         "tpot_mean_ms")
                                            if real.get(m) and emu.get(m) is not None}
    for n in names[1:]:
        eff = {}
        for engine in ("real", "emulated"):
            base, this = by.get((names[0], engine)), by.get((n, engine))
            if base and this:
                eff[engine] = {m: this[m] / base[m] for m in ("makespan_s", "e2e_mean_s", "e2e_p90_s", "tpot_mean_ms")
                               if base.get(m) and this.get(m) is not None}
        out["effect_vs_first"][n] = eff
    return out


def render(result: dict) -> str:
    a = result["args"]
    lines = ["### `lenpred bench crosscheck` — real SGLang vs the emulator, same workload", "",
             f"Command: `{result['command']}`", "",
             f"{result['prompts']} prompts from {a['prompts']} (seed {a['seed']}, <= {a['max_prompt_chars']} chars), "
             f"Poisson {a['rate']} req/s, greedy, max_tokens {a['max_tokens']}; {a['replicas']} replicas. Real: SGLang "
             f"0.5.23 on CPU serving SmolLM2-135M-Instruct with the tap, the real sidecar (CPU) and router. Emulated: "
             f"`{a['cost_model']}` preset, each request's real length and the real heads' prefill prediction "
             f"(MAE {result['prediction_mae'] or float('nan'):.1f} tokens over {result['measured']} requests, "
             f"predictions capped at max_tokens as the router caps them).", "",
             report.markdown_table(result["results"], COLUMNS), ""]
    comp = result["comparison"]
    for n, ratios in comp["emulated_over_real"].items():
        lines.append(f"- {n}: emulated / real — " + ", ".join(f"{m} {v:.2f}" for m, v in ratios.items()))
    for n, eff in comp["effect_vs_first"].items():
        for engine, ratios in eff.items():
            lines.append(f"- effect of {n} vs the first policy on {engine} engines — "
                         + ", ".join(f"{m} x{v:.2f}" for m, v in ratios.items()))
    lines.append("")
    return "\n".join(lines)


# -- calibration from real engines (--real) ------------------------------------------------------
def fit_cost(raw: dict) -> dict:
    """Step cost from SGLang's cumulative load counters, sampled per replica during the real runs.

    Decode: between two samples of a replica, the change of `decode_moments` = [steps, sum of batch
    sizes, sum of step times (us), ...] gives that window's mean batch size and mean step time;
    with the window's mean KV tokens in use, a least-squares fit (windows weighted by their steps)
    of step = a + b x batch + c x KV (c dropped when the fit makes it negative). Prefill: the
    change of `total_prefill_busy_us` over `total_prefill_uncached_tokens` is the time per prefill
    token (its per-step overhead included)."""
    rows, busy, toks = [], 0.0, 0
    for run in raw["runs"].values():
        by: dict[int, list] = {}
        for smp in run.get("loads") or []:
            by.setdefault(smp["replica"], []).append(smp)
        for samples in by.values():
            samples.sort(key=lambda x: x["t"])
            for s0, s1 in zip(samples, samples[1:]):
                m0, m1 = s0.get("decode_moments") or [0.0] * 6, s1.get("decode_moments") or [0.0] * 6
                n = m1[0] - m0[0]
                if n >= 3:
                    rows.append((n, (m1[1] - m0[1]) / n, (m1[2] - m0[2]) / n / 1e6,
                                 ((s0.get("num_used_tokens") or 0) + (s1.get("num_used_tokens") or 0)) / 2))
                dt = (s1.get("total_prefill_uncached_tokens") or 0) - (s0.get("total_prefill_uncached_tokens") or 0)
                db = (s1.get("total_prefill_busy_us") or 0) - (s0.get("total_prefill_busy_us") or 0)
                if dt > 0 and db >= 0:
                    busy, toks = busy + db / 1e6, toks + dt
    if len(rows) < 3:
        raise ValueError(f"only {len(rows)} decode windows in the load samples: nothing to fit")
    w, b, t, kv = (np.array(x, dtype=float) for x in zip(*rows))
    sw = np.sqrt(w)
    # Costs are not negative: drop a term whose least-squares slope comes out below zero (on the
    # H200 with CUDA graphs a decode step barely grows with the batch, and the KV term took it all).
    one = np.ones_like(b)
    for names in (("base", "token", "kv"), ("base", "token"), ("base", "kv"), ("base",)):
        X = np.stack([{"base": one, "token": b, "kv": kv}[n] for n in names], 1)
        sol, *_ = np.linalg.lstsq(X * sw[:, None], t * sw, rcond=None)
        if (sol[1:] >= 0).all():
            break
    coef = dict(zip(names, map(float, sol)))
    pred = X @ sol
    total = float(np.sum(w * (t - np.average(t, weights=w)) ** 2))
    r2 = 1 - float(np.sum(w * (t - pred) ** 2)) / total if total > 0 else 1.0
    return {"step_base_s": coef["base"], "step_per_token_s": coef.get("token", 0.0),
            "step_per_kv_token_s": coef.get("kv", 0.0),
            "step_per_prefill_token_s": busy / toks if toks else 0.0,
            "decode_windows": len(rows), "decode_steps": int(w.sum()), "weighted_r2": r2,
            "batch_range": [float(b.min()), float(b.max())], "kv_range": [float(kv.min()), float(kv.max())],
            "step_ms_range": [1000 * float(t.min()), 1000 * float(t.max())], "prefill_tokens": toks}


def real_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lenpred bench crosscheck --real")
    p.add_argument("--real", required=True, help="schedule-real result JSON (its _raw.json beside it)")
    p.add_argument("--only", default="", help="comma-separated run labels")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: emulators and routers are stopped
    real = json.loads(pathlib.Path(a.real).read_text())
    raw = json.loads(pathlib.Path(a.real[: -len(".json")] + "_raw.json").read_text())
    fit = fit_cost(raw)
    eng_spec, err = real["engine"], real["error_model"]
    items = {i: Item(str(i), i, pt, ot, cap) for i, pt, ot, cap in raw["items"]}
    batch_items = {i: Item(str(i), i, pt, ot, cap) for i, pt, ot, cap in raw.get("batch_items", raw["items"])}
    preds = raw["predicted_p50"]
    sigma = math.log(err.get("p90_factor", 1.0)) / 1.2816 if err.get("p90_factor") else 0.0
    log_dir = pathlib.Path(a.log_dir or tempfile.mkdtemp(prefix="lenpred-crosscheck-real-"))
    slo = real.get("slo") or None
    out_rows = []
    with contextlib.ExitStack() as stack:
        redis = RedisServer.start()
        stack.callback(redis.stop)
        for k, row in enumerate(real["rows"]):
            if a.only and row["label"] not in a.only.split(","):
                continue
            policy = str(POLICY_DIR / pathlib.Path(row["policy"]).name)
            ports = [free_port() for _ in range(real["replicas"])]
            emu = spawn(f"emulator-{k}", [sys.executable, "-m", "lenpred.harness.emulator", "--ports",
                                          ",".join(map(str, ports)), "--time-scale", str(a.time_scale),
                                          f"--step-base-s={fit['step_base_s']}",
                                          f"--step-per-token-s={fit['step_per_token_s']}",
                                          f"--step-per-kv-token-s={fit['step_per_kv_token_s']}",
                                          f"--step-per-prefill-token-s={fit['step_per_prefill_token_s']}",
                                          "--max-total-num-tokens", str(eng_spec["max_total_tokens"]),
                                          "--max-running-requests", str(eng_spec["max_running_requests"]),
                                          "--enable-priority", "--redis-url", redis.url, "--namespace", f"twin{k}",
                                          "--plp-every", str(eng_spec["tap_every"]), "--prediction-sigma", str(sigma),
                                          "--model", "default"], log_dir)
            oracle = row["predictions"] == "oracle"

            def make(it: Item, label=row["label"], prio=row.get("client_priority")) -> dict:
                return {"input_ids": prompt_ids(it, label), "sampling_params": {"max_new_tokens": it.cap},
                        "custom_params": {"emulated_output_len": it.output_tokens, "emulated_id": it.id,
                                          "emulated_prediction": float(it.output_tokens) if oracle else preds[it.index]},
                        **({"priority": prompt_priority(it)} if prio else {})}

            try:
                urls = [f"http://127.0.0.1:{x}" for x in ports]
                for u in urls:
                    wait_http(emu, u + "/health", 30)
                router, url = run_router(policy, urls, redis.url, f"twin{k}", log_dir, f"router-twin-{k}")
                real_results = [rp.Result(**dict(zip(raw["row_fields"], x))) for x in raw["runs"][row["label"]]["results"]]
                print(f"[crosscheck] emulated twin of {row['label']} ...", flush=True)
                try:
                    if row["mode"] == "online":
                        arrivals = [(r.sent, items[r.index]) for r in real_results]
                        res, _, _ = asyncio.run(rp.online(url, [], arrivals, make, warmup_s=row.get("warmup_s", 0.0),
                                                          drain_s=real.get("drain_s", 60.0)))
                        emu_row = sm.online(res, row["window_s"], slo)
                    else:
                        res, _, _, _ = asyncio.run(rp.batch(url, [], [batch_items[r.index] for r in real_results], make,
                                                            timeout_s=None))
                        emu_row = sm.batch(res)
                finally:
                    router.stop()
            finally:
                emu.stop()
            keys_ = ("tpot_p50_ms", "tpot_p99_ms", "ttft_p50_s", "ttft_p99_s", "goodput_rps", "makespan_s",
                     "throughput_rps")
            out_rows.append({"label": row["label"], "mode": row["mode"], "rate_rps": row.get("rate_rps"),
                             **{f"real_{m}": row.get(m) for m in keys_ if row.get(m) is not None},
                             **{f"emulated_{m}": emu_row.get(m) for m in keys_ if emu_row.get(m) is not None}})
            print(f"[crosscheck]   {json.dumps(out_rows[-1], default=str)}", flush=True)
    result = {"bench": "crosscheck-real", "real": os.path.relpath(a.real), "fit": fit, "rows": out_rows,
              "slo": slo, "environment": report.environment(),
              "command": "lenpred bench crosscheck " + " ".join(argv)}
    report.write(result, a.json, a.md, render_real(result, real))
    return 0


def render_real(result: dict, real: dict) -> str:
    f = result["fit"]
    lines = ["### Emulator calibrated from real SGLang engines, and replayed against them", "",
             f"Command: `{result['command']}` (real runs: `{real['command']}`)", "",
             f"Fitted step cost ({f['decode_windows']} decode windows, {f['decode_steps']} steps, weighted R² "
             f"{f['weighted_r2']:.2f}; batch {f['batch_range'][0]:.0f}–{f['batch_range'][1]:.0f}, KV "
             f"{f['kv_range'][0]:.0f}–{f['kv_range'][1]:.0f} tokens, steps {f['step_ms_range'][0]:.1f}–"
             f"{f['step_ms_range'][1]:.1f} ms): a = {1000 * f['step_base_s']:.2f} ms, b = "
             f"{1e6 * f['step_per_token_s']:.1f} µs per decode row, c = {1e9 * f['step_per_kv_token_s']:.1f} ns per KV "
             f"token, prefill {1e6 * f['step_per_prefill_token_s']:.1f} µs per token ({f['prefill_tokens']} tokens).", ""]
    cols = ["label"] + [k for k in ("real_tpot_p99_ms", "emulated_tpot_p99_ms", "real_ttft_p50_s", "emulated_ttft_p50_s",
                                    "real_goodput_rps", "emulated_goodput_rps", "real_makespan_s",
                                    "emulated_makespan_s") if any(k in r for r in result["rows"])]
    lines += [report.markdown_table(result["rows"], cols), ""]
    rr = {r.get("rate_rps"): r for r in result["rows"] if r["label"].startswith("round-robin")}
    for r in result["rows"]:
        base = rr.get(r.get("rate_rps"))
        if r["mode"] != "online" or base is None or base is r:
            continue
        eff = {f"{e} {m}": (r.get(f"{e}_{m}") or 0) / (base.get(f"{e}_{m}") or float("nan"))
               for m in ("tpot_p99_ms", "goodput_rps") for e in ("real", "emulated")}
        lines.append(f"- {r['label']} vs {base['label']}: " + ", ".join(f"{k} x{v:.2f}" for k, v in eff.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

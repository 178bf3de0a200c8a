"""`lenpred bench schedule`: replay a real output-length trace through the real router (a separate
`lenpred router serve` process, over HTTP) against R emulated SGLang replicas, for several policies
on the same trace in the same run, and report throughput, makespan, TTFT/TPOT/end-to-end latency
percentiles, goodput under an SLO and preemptions.

Every latency and throughput number here is EMULATED: engines are `lenpred.harness.emulator` with a
step-cost preset (`--cost-model`, documented in docs/ROUTER.md), run `--time-scale` times slower
(or faster) than emulated time; reported seconds are emulated seconds.

Seed B's trace has lengths but no prompts, so no head can predict it: each item's prediction is its
true length times a log-normal error (`--error lognormal:SIGMA`, default sigma 0.7, which matches the
error seed B's own predictor reports on this trace: MAE 62 tokens, Acc-50 59%), or errors drawn from
a residual file (`--error residuals:FILE`, a JSON list of log(pred/true)), or none (oracle). A file
`sidecar/heads/*/residuals.json` is used by default when one exists. The prediction reaches the
router the real way: the emulator (standing in for the sidecar) writes it to Redis under the rid at
prefill (EGTP) and every `--plp-every` tokens (PLP, error shrinking with tokens decoded).

    lenpred bench schedule --mode online --replicas 4 --rate 300 --n 1000 --json out.json --md out.md
    lenpred bench schedule --mode batch --engine static --replicas 4 --n 1000 --json b.json
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lenpred.bench import report
from lenpred.bench.real.replay import batch_messages
from lenpred.harness.emulator import COST_MODELS
from lenpred.harness.redisproc import RedisServer, free_port

DEFAULT_TRACE = "../shared/data/seqsched-vicuna7b/alpaca-val-10k-length.json"
POLICY_DIR = Path(__file__).resolve().parent.parent / "router" / "policies"
DEFAULT_SIGMA = 0.7
SLO = {"gpu-h100-7b": (1.0, 0.030), "cpu-smollm2": (10.0, 0.5)}   # (TTFT s, TPOT s), emulated


@dataclass
class Run:
    label: str
    policy: str
    predictions: str            # "predicted" | "oracle" | "none"
    engine_priority: bool = False


@dataclass
class Sample:
    index: int
    out_len: int
    pred: float
    sent: float = 0.0
    done: float = 0.0
    ok: bool = False
    tokens: int = 0
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    engine_e2e: float | None = None
    parts: int = 1
    retractions: int = 0
    extra: dict = field(default_factory=dict)


# -- trace and predictions ----------------------------------------------------------------------
def load_trace(path: str, column: str, n: int, seed: int) -> list[tuple[str, int]]:
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    items = [(str(d["id"]), int(d[column])) for d in data if int(d[column]) > 0]
    rng.shuffle(items)
    return items[:n]


def default_error() -> str:
    found = sorted(glob.glob("sidecar/heads/*/residuals.json"))
    return f"residuals:{found[0]}" if found else f"lognormal:{DEFAULT_SIGMA}"


def predictions(items: list[tuple[str, int]], error: str, seed: int, cap: int) -> list[float]:
    kind, _, arg = error.partition(":")
    if kind == "oracle":
        return [float(L) for _, L in items]
    if kind == "lognormal":
        sigma = float(arg or DEFAULT_SIGMA)
        return [min(L * math.exp(random.Random(f"{seed}:{i}").gauss(0, sigma)), cap) for i, L in items]
    if kind == "residuals":
        res = json.loads(Path(arg).read_text())
        res = res.get("log_ratio", res) if isinstance(res, dict) else res
        return [min(L * math.exp(random.Random(f"{seed}:{i}").choice(res)), cap) for i, L in items]
    raise SystemExit(f"--error: unknown kind {kind!r} (lognormal:SIGMA | residuals:FILE | oracle)")


def accuracy(items, preds) -> dict:
    err = [abs(p - L) for (_, L), p in zip(items, preds)]
    return {"mae": statistics.fmean(err), "acc50": sum(e <= 50 for e in err) / len(err),
            "acc100": sum(e <= 100 for e in err) / len(err)}


def body_for(item: tuple[str, int], pred: float, prompt_tokens: int, max_new: int, oracle: bool) -> dict:
    iid, L = item
    rng = random.Random(iid)
    return {"input_ids": [rng.randrange(100, 30000) for _ in range(prompt_tokens)],
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0},
            "custom_params": {"emulated_output_len": L, "emulated_id": iid,
                              "emulated_prediction": float(L) if oracle else pred}}


# -- processes -----------------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_emulators(args, ports: list[int], redis_url: str, ns: str, static: bool, priority: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lenpred.harness.emulator", "--ports", ",".join(map(str, ports)),
           "--cost-model", args.cost_model, "--time-scale", str(args.time_scale), "--redis-url", redis_url,
           "--namespace", ns, "--plp-every", str(args.plp_every), "--prediction-sigma", "0.5",
           "--seed", str(args.seed)]
    if static:
        cmd.append("--static-batching")
        cmd += ["--max-running-requests", "128"]
    if priority:
        cmd.append("--enable-priority")
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def start_router(policy: str, backends: list[str], redis_url: str, ns: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lenpred.router.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--backends", ",".join(backends), "--policy", policy, "--redis-url", redis_url, "--namespace", ns,
           "--log-level", "warning"]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_ready(url: str, path: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1.0) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if (await c.get(url + path)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url}{path} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- measurement ---------------------------------------------------------------------------------
def fill(sample: Sample, payload: dict, scale: float) -> None:
    meta = payload.get("meta_info") or {}
    timing = meta.get("emulated_timing") or {}
    sample.tokens = int(meta.get("completion_tokens", 0))
    sample.e2e = (sample.done - sample.sent) / scale
    decode = timing.get("decode_s")
    if decode is not None:
        sample.ttft = max(sample.e2e - decode, 0.0)
        sample.tpot = decode / max(sample.tokens - 1, 1)
        if timing.get("ttft_s") is not None:
            sample.engine_e2e = timing["ttft_s"] + decode
    sample.parts = int(meta.get("lenpred_parts", 1))
    sample.retractions = int(timing.get("retractions", 0))
    sample.ok = True


async def replay_online(router_url: str, items, preds, args, oracle: bool) -> list[Sample]:
    rng = random.Random(args.seed)
    samples = [Sample(i, L, p) for i, ((_, L), p) in enumerate(zip(items, preds))]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=router_url, timeout=httpx.Timeout(None), limits=limits) as c:
        async def one(s: Sample, body: dict) -> None:
            s.sent = time.monotonic()
            try:
                r = await c.post("/generate", json=body)
                s.done = time.monotonic()
                if r.status_code == 200:
                    fill(s, r.json(), args.time_scale)
                else:
                    s.extra["status"] = r.status_code
            except httpx.HTTPError as e:
                s.extra["error"] = str(e)

        tasks, t = [], time.monotonic()
        for s, item in zip(samples, items):
            body = body_for(item, s.pred, args.prompt_tokens, args.max_new_tokens, oracle)
            now = time.monotonic()
            if t > now:
                await asyncio.sleep(t - now)
            tasks.append(asyncio.create_task(one(s, body)))
            t += rng.expovariate(args.rate) * args.time_scale
        await asyncio.gather(*tasks)
    return samples


async def replay_batch(router_url: str, items, preds, args, oracle: bool) -> tuple[list[Sample], dict]:
    samples = [Sample(i, L, p) for i, ((_, L), p) in enumerate(zip(items, preds))]
    bodies = [body_for(item, s.pred, args.prompt_tokens, args.max_new_tokens, oracle) for s, item in zip(samples, items)]
    summary: dict = {}
    async with httpx.AsyncClient(base_url=router_url, timeout=httpx.Timeout(None)) as c:
        t0 = time.monotonic()
        for s in samples:
            s.sent = t0
        async for msg in batch_messages(c, bodies):
            if "summary" in msg:
                summary = msg["summary"]
                continue
            s = samples[msg["index"]]
            s.done = time.monotonic()
            if msg["status"] == 200:
                fill(s, msg["response"], args.time_scale)
            else:
                s.extra["status"] = msg["status"]
    return samples, summary


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def summarize(samples: list[Sample], args, wall_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    start = min(s.sent for s in samples)
    end = max((s.done for s in ok), default=start)
    span = (end - start) / args.time_scale
    slo_ttft, slo_tpot = args.slo_ttft_s, args.slo_tpot_s
    good = [s for s in ok if s.ttft is not None and s.ttft <= slo_ttft and (s.tpot or 0) <= slo_tpot]
    overhead = [(s.e2e - s.engine_e2e) * args.time_scale * 1000 for s in ok if s.engine_e2e is not None]
    return {
        "completed": len(ok), "failed": len(samples) - len(ok),
        "makespan_s": span, "throughput_rps": len(ok) / span if span else 0.0,
        "throughput_tok_s": sum(s.tokens for s in ok) / span if span else 0.0,
        "ttft_p50_s": pct([s.ttft for s in ok], 0.5), "ttft_p99_s": pct([s.ttft for s in ok], 0.99),
        "tpot_p50_ms": (pct([s.tpot for s in ok], 0.5) or 0) * 1000,
        "tpot_p99_ms": (pct([s.tpot for s in ok], 0.99) or 0) * 1000,
        "e2e_p50_s": pct([s.e2e for s in ok], 0.5), "e2e_p99_s": pct([s.e2e for s in ok], 0.99),
        "e2e_mean_s": statistics.fmean(s.e2e for s in ok) if ok else None,
        "goodput_rps": len(good) / span if span else 0.0, "slo_attainment": len(good) / max(len(samples), 1),
        "continued": sum(1 for s in ok if s.parts > 1),
        "router_http_overhead_wall_ms_p50": pct(overhead, 0.5), "router_http_overhead_wall_ms_p99": pct(overhead, 0.99),
        "wall_s": wall_s,
    }


async def run_one(run: Run, items, preds, args, redis: RedisServer, k: int) -> dict:
    import psutil

    ns = f"bench{k}-{os.getpid()}"
    ports = [free_port() for _ in range(args.replicas)]
    backends = [f"http://127.0.0.1:{p}" for p in ports]
    static = args.mode == "batch" and args.engine == "static"
    emu = start_emulators(args, ports, redis.url, ns, static, run.engine_priority)
    rport = free_port()
    router = None
    try:
        for b in backends:
            await wait_ready(b, "/health", proc=emu)
        router = start_router(run.policy, backends, redis.url, ns, rport)
        rurl = f"http://127.0.0.1:{rport}"
        await wait_ready(rurl, "/ready", proc=router)
        await asyncio.sleep(0.3)  # first load poll and the event subscription
        rproc, eproc = psutil.Process(router.pid), psutil.Process(emu.pid)
        cpu0 = (sum(rproc.cpu_times()[:2]), sum(eproc.cpu_times()[:2]))
        t0 = time.monotonic()
        summary = {}
        if args.mode == "online":
            samples = await replay_online(rurl, items, preds, args, run.predictions == "oracle")
        else:
            samples, summary = await replay_batch(rurl, items, preds, args, run.predictions == "oracle")
        wall = time.monotonic() - t0
        cpu = (sum(rproc.cpu_times()[:2]) - cpu0[0], sum(eproc.cpu_times()[:2]) - cpu0[1])
        engine = {"retractions": 0, "priority_preemptions": 0, "steps": 0, "lag_steps": 0, "busy_s": 0.0,
                  "prompt_tokens": 0, "cached_prompt_tokens": 0}
        async with httpx.AsyncClient(timeout=10) as c:
            for b in backends:
                st = (await c.get(f"{b}/emulator/requests")).json()
                for key in engine:
                    engine[key] += st.get(key, 0)
            metrics = (await c.get(f"{rurl}/metrics")).text
        out = {"label": run.label, "policy": os.path.relpath(run.policy), "predictions": run.predictions,
               **summarize(samples, args, wall), "engine": engine,
               "router_cpu_s": cpu[0], "router_cpu_util": cpu[0] / wall, "emulator_cpu_util": cpu[1] / wall,
               "router_preemptions": _metric(metrics, "lenpred_router_preemptions_total"),
               "probes": {o: _metric(metrics, f'lenpred_router_probes_total{{outcome="{o}"}}')
                          for o in ("prediction", "timeout", "failed")},
               "batch_summary": summary}
        out["preemptions"] = engine["retractions"] + out["router_preemptions"]
        if summary.get("replica_finish_s"):
            fin = [v / args.time_scale for v in summary["replica_finish_s"].values()]
            out["replica_finish_spread"] = (max(fin) - min(fin)) / max(fin) if max(fin) else 0.0
        return out
    finally:
        if router is not None:
            stop(router)
        stop(emu)


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def default_runs(args) -> list[Run]:
    P = lambda n: str(POLICY_DIR / n)  # noqa: E731
    if args.mode == "online":
        runs = [Run("round-robin FCFS", P("baseline-round-robin.yaml"), "none"),
                Run("least-load", P("baseline-least-load.yaml"), "none")]
        tested = args.policy or [P("predicted.yaml"), P("predicted-preempt.yaml")]
    elif args.engine == "static":
        runs = [Run("vanilla (FCFS batches of 16)", P("batch-vanilla.yaml"), "none")]
        tested = args.policy or [P("batch-seqsched.yaml"), P("batch-seqsched-vbs-fcr.yaml")]
    else:
        runs = [Run("FCFS round-robin, all at once", P("batch-rl-fcfs.yaml"), "none")]
        tested = args.policy or [P("batch-rl-lpt.yaml")]
    for f in tested:
        prio = args.mode == "online" and Path(f).stem.startswith("predicted")
        runs.append(Run(f"{Path(f).stem} (predicted)", f, "predicted", prio))
    for f in tested[-1:] if args.mode == "online" else tested:
        prio = args.mode == "online" and Path(f).stem.startswith("predicted")
        runs.append(Run(f"{Path(f).stem} (oracle)", f, "oracle", prio))
    return runs


COLUMNS_ONLINE = ["label", "throughput_rps", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "e2e_p50_s",
                  "e2e_p99_s", "goodput_rps", "slo_attainment", "preemptions", "router_cpu_util"]
COLUMNS_BATCH = ["label", "makespan_s", "throughput_rps", "throughput_tok_s", "e2e_mean_s", "e2e_p99_s", "continued",
                 "replica_finish_spread", "preemptions", "router_cpu_util"]


def render(result: dict) -> str:
    a = result["args"]
    cols = COLUMNS_ONLINE if a["mode"] == "online" else COLUMNS_BATCH
    lines = [f"### `lenpred bench schedule` — {a['mode']} mode (EMULATED engines)", "",
             f"Command: `{result['command']}`", "",
             f"Trace: {a['trace']} column {a['column']}, {a['n']} requests, prompt {a['prompt_tokens']} tokens; "
             f"{a['replicas']} replicas, cost model `{a['cost_model']}` ({result['cost_model']}), "
             f"time scale {a['time_scale']} wall s per emulated s"
             + (f", Poisson arrivals {a['rate']} req/s (emulated)" if a["mode"] == "online" else
                f", engine: {a['engine']} batching, all requests submitted at t=0 via POST /v1/lenpred/batch"),
             f"Predictions: {result['error_model']} (MAE {result['prediction_accuracy']['mae']:.1f} tokens, "
             f"Acc-50 {result['prediction_accuracy']['acc50']:.0%}, Acc-100 {result['prediction_accuracy']['acc100']:.0%}); "
             "oracle rows use the true lengths.",
             f"SLO for goodput: TTFT <= {a['slo_ttft_s']} s and TPOT <= {a['slo_tpot_s'] * 1000:.0f} ms (emulated).", "",
             report.markdown_table(result["runs"], cols), ""]
    base = result["runs"][0]
    lines.append("Relative to the first row: " + "; ".join(
        f"{r['label']}: " + (f"throughput x{r['throughput_rps'] / base['throughput_rps']:.2f}, makespan "
                             f"x{r['makespan_s'] / base['makespan_s']:.2f}" if a["mode"] == "batch" else
                             f"P99 TPOT {100 * (r['tpot_p99_ms'] / base['tpot_p99_ms'] - 1):+.0f}%, goodput "
                             f"x{r['goodput_rps'] / max(base['goodput_rps'], 1e-9):.2f}")
        for r in result["runs"][1:]) + ".")
    lines.append("")
    lines.append("Emulator lag (steps whose Python work overran the emulated step): " + ", ".join(
        f"{r['label']}: {r['engine']['lag_steps'] / max(r['engine']['steps'], 1):.1%}" for r in result["runs"]) + ".")
    lines.append("Router+HTTP time per request (wall ms, client e2e minus engine time) p50/p99: " + ", ".join(
        f"{r['label']}: {r['router_http_overhead_wall_ms_p50'] or 0:.1f}/{r['router_http_overhead_wall_ms_p99'] or 0:.1f}"
        for r in result["runs"]) + ".")
    lines.append("Prompt tokens served from the emulated prefix cache: " + ", ".join(
        f"{r['label']}: {r['engine'].get('cached_prompt_tokens', 0) / max(r['engine'].get('prompt_tokens', 0), 1):.0%}"
        for r in result["runs"]) + ".")
    probed = [r for r in result["runs"] if sum((r.get("probes") or {}).values())]
    if probed:
        lines.append("Probe outcomes (prediction/timeout/failed): " + ", ".join(
            f"{r['label']}: " + "/".join(f"{r['probes'][o]:.0f}" for o in ("prediction", "timeout", "failed"))
            for r in probed) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lenpred bench schedule", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("--column", default="L_t0.0", help="length column of the trace (seed B: L_t0.0 .. L_t0.7)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--policy", action="append", default=[], help="policy file under test (repeatable); baselines "
                   "and an oracle run are added")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--rate", type=float, default=300.0, help="online: Poisson arrival rate, emulated req/s")
    p.add_argument("--mode", choices=["online", "batch"], default="online")
    p.add_argument("--engine", choices=["static", "continuous"], default="static", help="batch mode engines")
    p.add_argument("--cost-model", choices=sorted(COST_MODELS), default="gpu-h100-7b")
    p.add_argument("--time-scale", type=float, default=None, help="wall s per emulated s (default: auto)")
    p.add_argument("--error", default=None, help="lognormal:SIGMA | residuals:FILE | oracle")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--plp-every", type=int, default=16)
    p.add_argument("--slo-ttft-s", type=float, default=None)
    p.add_argument("--slo-tpot-s", type=float, default=None)
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    if args.time_scale is None:
        if args.mode == "online":
            args.time_scale = max(1.0, args.rate / 40.0)
        else:
            args.time_scale = 0.5 if args.cost_model == "gpu-h100-7b" else 0.02
    slo = SLO[args.cost_model]
    args.slo_ttft_s = args.slo_ttft_s or slo[0]
    args.slo_tpot_s = args.slo_tpot_s or slo[1]
    args.error = args.error or default_error()
    items = load_trace(args.trace, args.column, args.n, args.seed)
    preds = predictions(items, args.error, args.seed, args.max_new_tokens)
    runs = default_runs(args)
    if args.only:
        keys = args.only.split(",")
        runs = [r for r in runs if any(k in r.label for k in keys)]
    redis = RedisServer.start()
    results = []
    try:
        for k, run in enumerate(runs):
            print(f"[schedule] {run.label} ...", file=sys.stderr, flush=True)
            res = asyncio.run(run_one(run, items, preds, args, redis, k))
            print(f"[schedule]   {json.dumps({c: res.get(c) for c in (COLUMNS_ONLINE if args.mode == 'online' else COLUMNS_BATCH)}, default=str)}",
                  file=sys.stderr, flush=True)
            results.append(res)
    finally:
        redis.stop()
    result = {"bench": "schedule", "emulated": True, "args": vars(args), "environment": report.environment(),
              "command": "lenpred bench schedule " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cost_model": COST_MODELS[args.cost_model], "error_model": args.error,
              "prediction_accuracy": accuracy(items, preds), "runs": results}
    report.write(result, args.json, args.md, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

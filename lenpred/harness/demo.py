"""`lenpred demo`: the whole spine on this machine, on real parts.

Redis (yours via --redis-url, else a private one) -> sidecar (CPU fallback, shipped heads) ->
real SGLang replica(s) serving the shipped SmolLM2-135M-Instruct with the tap loaded through its
entry point -> the router in front. A handful of real prompts go through the router; the demo
prints prompt, predicted p50/p90 (EGTP, at prefill), the true length, and one JSON line. It exits
non-zero unless every request succeeded and was predicted from hidden states.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import json
import os
import pathlib
import sys
import tempfile
import time

import httpx

from lenpred.contract import keys
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc, wait_http
from lenpred.harness.redisproc import RedisServer, free_port


def load_prompts(path: str | None, limit: int) -> list[dict]:
    if path:
        text = pathlib.Path(path).read_text()
    else:
        text = importlib.resources.files("lenpred").joinpath("data/demo_prompts.jsonl").read_text()
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"lenpred demo: {path}:{i}: not JSON ({e})")
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SystemExit(f'lenpred demo: {path}:{i}: expected {{"prompt": "..."}}')
        rows.append({"id": row.get("id", f"p{i}"), "prompt": row["prompt"]})
    return rows[:limit]


async def send_all(router: str, prompts: list[dict], max_tokens: int, temperature: float,
                   headers: dict | None = None) -> list[dict]:
    async with httpx.AsyncClient(base_url=router, timeout=600, headers=headers) as c:
        async def one(p):
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": p["prompt"]}],
                "max_tokens": max_tokens, "temperature": temperature})
            out = {"id": p["id"], "prompt": p["prompt"], "status": r.status_code,
                   "rid": r.headers.get("x-lenpred-rid"), "latency_s": time.perf_counter() - t0}
            if r.status_code == 200:
                body = r.json()
                out["true_len"] = body["usage"]["completion_tokens"]
                out["truncated"] = body["choices"][0].get("finish_reason") == "length"
            else:
                out["error"] = r.text[:300]
            return out
        return await asyncio.gather(*(one(p) for p in prompts))


def collect_predictions(redis_url: str, ns: str, router: str, results: list[dict], timeout: float = 20) -> None:
    """EGTP's prediction (made at prefill, before any token was generated) comes from the finished
    stream, where the sidecar records it next to the engine's true length; the router's debug
    endpoint shows that the router saw the same request id."""
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    want = {x["rid"] for x in results if x.get("rid")}
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while time.monotonic() < deadline and want - set(found):
        found.update({e["rid"]: e for _, e in r.xrange(keys.finished_stream(ns)) if e["rid"] in want})
        time.sleep(0.3)
    for x in results:
        fin = found.get(x.get("rid"))
        x["p50"] = float(fin["p50"]) if fin and float(fin["p50"]) >= 0 else None
        x["p90"] = float(fin["p90"]) if fin and float(fin["p90"]) >= 0 else None
        x["last_source"] = r.hget(keys.pred_key(ns, x["rid"]), "source") if x.get("rid") else None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            x["router_view"] = httpx.get(f"{router}/v1/lenpred/requests/{x['rid']}", timeout=5).json()
    r.close()


def abs_error(x: dict) -> float:
    """|p50 - true|; a reply cut by max_tokens is censored (true >= cap), so only a p50 below the
    cap is known to be wrong, by at least cap - p50."""
    if x.get("truncated"):
        return max(0.0, x["true_len"] - x["p50"])
    return abs(x["p50"] - x["true_len"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", default=os.environ.get("LENPRED_REDIS_URL"),
                    help="existing Redis (default: start a private one)")
    ap.add_argument("--prompts", default=None, help='jsonl of {"prompt": ...} (default: the shipped sample)')
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512,
                    help="cap per reply (the shipped heads were trained with a 512-token cap)")
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="sampling temperature (the shipped heads were trained on samples at 0.7)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--namespace", default="demo")
    ap.add_argument("--heads", default=None, help="heads folder for the sidecar (default: the shipped heads)")
    ap.add_argument("--log-dir", default=None)
    a = ap.parse_args(argv)

    prompts = load_prompts(a.prompts, a.limit)
    log_dir = pathlib.Path(a.log_dir or tempfile.mkdtemp(prefix="lenpred-demo-"))
    from lenpred.harness.engine import start_engine

    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        redis_url = a.redis_url
        if not redis_url:
            srv = RedisServer.start()
            stack.callback(srv.stop)
            redis_url = srv.url
        print(f"[demo] redis      {redis_url}", flush=True)

        sc_port = free_port()
        sidecar = spawn("sidecar", lenpred_argv("sidecar", "--port", str(sc_port), "--redis-url", redis_url,
                                                "--namespace", a.namespace, "--device", "cpu",
                                                *(["--heads", a.heads] if a.heads else [])), log_dir)
        stack.callback(sidecar.stop)
        wait_grpc(sidecar, f"127.0.0.1:{sc_port}", 60)
        print(f"[demo] sidecar    127.0.0.1:{sc_port} (CPU fallback)", flush=True)

        engines = []
        for i in range(a.replicas):
            port = free_port()
            print(f"[demo] engine {i}   starting real SGLang on :{port} (CPU; ~70 s)...", flush=True)
            eng = start_engine(port, f"127.0.0.1:{sc_port}", log_path=log_dir / f"engine-{i}.log")
            stack.callback(eng.stop)
            engines.append(eng)

        r_port = free_port()
        router = spawn("router", lenpred_argv("router", "serve", "--host", "127.0.0.1", "--port", str(r_port),
                                              "--backends", ",".join(e.url for e in engines),
                                              "--redis-url", redis_url, "--namespace", a.namespace), log_dir)
        stack.callback(router.stop)
        router_url = f"http://127.0.0.1:{r_port}"
        wait_http(router, router_url + "/ready", 60)
        print(f"[demo] router     {router_url}  (up in {time.monotonic() - t0:.0f} s; logs in {log_dir})", flush=True)

        print(f"[demo] sending {len(prompts)} real prompts (max_tokens {a.max_tokens})...", flush=True)
        results = asyncio.run(send_all(router_url, prompts, a.max_tokens, a.temperature))
        collect_predictions(redis_url, a.namespace, router_url, results)

    ok = [x for x in results if x["status"] == 200]
    predicted = [x for x in ok if x.get("p50") is not None]
    print()
    print(f"{'prompt':<52} {'p50':>6} {'p90':>6} {'true':>6}")
    for x in results:
        text = x["prompt"].replace("\n", " ")
        text = text[:49] + "..." if len(text) > 52 else text
        p50 = f"{x['p50']:.0f}" if x.get("p50") is not None else "-"
        p90 = f"{x['p90']:.0f}" if x.get("p90") is not None else "-"
        true = f"{x['true_len']}{'+' if x.get('truncated') else ''}" if "true_len" in x else f"HTTP {x['status']}"
        print(f"{text:<52} {p50:>6} {p90:>6} {true:>6}")
    print("(+ = stopped by max_tokens: the true length is at least this; its error counts only if p50 is below it)")
    mae = (sum(abs_error(x) for x in predicted) / len(predicted)) if predicted else None
    summary = {"requests": len(results), "ok": len(ok), "predicted": len(predicted),
               "mae": round(mae, 2) if mae is not None else None}
    for x in results:
        if x["status"] != 200:
            print(f"[demo] {x['id']}: HTTP {x['status']}: {x.get('error')}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if len(ok) == len(results) == len(predicted) else 1

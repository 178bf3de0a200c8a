"""`lenpred bench router`: requests/s and added latency of the lenpred router in front of fast stub
backends, against the same stubs reached directly and through SGLang's gateway (`sglang-router`,
the Rust router from PyPI), on the same machine with the same load generator.

Stubs: a minimal ASGI app on uvicorn (one process, one port per backend) that answers the OpenAI
and SGLang endpoints at once with a fixed small answer, plus what routers poll (`/health`,
`/v1/loads`, `/server_info`, `/get_model_info`, `/v1/models`). Nothing is generated: what is
measured is the router.

Load generator: its own process (aiohttp, one connection per worker, keep-alive). Two phases per
target: closed loop (`--concurrency` workers back to back for `--duration` s: the most req/s), and
open loop at a fixed `--rate` (Poisson arrivals: latency percentiles at a load every target can
carry). Added latency = the target's percentile minus the direct percentile at that rate.

    lenpred bench router --backends 2 --duration 10 --concurrency 32 --rate 200 --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from lenpred.bench import report
from lenpred.harness.redisproc import free_port

POLICY_DIR = Path(__file__).resolve().parent.parent / "router" / "policies"

# -- stub backend -----------------------------------------------------------------------------------
_ANSWER = {
    "chat": json.dumps({"id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": " t1 t2 t3 t4"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}}).encode(),
    "generate": json.dumps({"text": " t1 t2 t3 t4", "output_ids": [1, 2, 3, 4],
                            "meta_info": {"id": "stub", "finish_reason": {"type": "stop"}, "prompt_tokens": 8,
                                          "completion_tokens": 4}}).encode(),
}
_LOADS = json.dumps({"timestamp": "", "version": "0.5.23", "loads": [{
    "dp_rank": 0, "num_running_reqs": 0, "num_waiting_reqs": 0, "num_used_tokens": 0,
    "max_total_num_tokens": 1000000, "token_usage": 0.0, "gen_throughput": 0.0}]}).encode()
_INFO = json.dumps({"model_path": "stub", "served_model_name": "stub", "version": "0.5.23",
                    "max_total_num_tokens": 1000000, "is_generation": True, "tokenizer_path": "stub",
                    "dp_size": 1}).encode()
_MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "sglang"}]}).encode()


async def stub_app(scope, receive, send):
    """A raw ASGI app: no framework, so the stub costs as little as uvicorn allows."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    more = True
    while more:  # drain the body
        msg = await receive()
        more = msg.get("more_body", False)
    if path in ("/v1/chat/completions", "/v1/completions"):
        body = _ANSWER["chat"]
    elif path == "/generate":
        body = _ANSWER["generate"]
    elif path == "/v1/loads":
        body = _LOADS
    elif path in ("/server_info", "/get_server_info", "/get_model_info"):
        body = _INFO
    elif path == "/v1/models":
        body = _MODELS
    else:  # /health, /health_generate, /abort_request, anything a gateway probes
        body = b"{}"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def serve_stubs(ports: list[int]) -> None:
    import uvicorn

    servers = [uvicorn.Server(uvicorn.Config(stub_app, host="127.0.0.1", port=p, log_level="warning",
                                             access_log=False, lifespan="on")) for p in ports]
    await asyncio.gather(*(s.serve() for s in servers))


# -- load generator ------------------------------------------------------------------------------
BODY = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "Say hello in four words."}],
                   "max_tokens": 16, "stream": False}).encode()


async def _post_ok(session, url: str) -> bool:
    """One request, body read; True on HTTP 200."""
    import aiohttp

    try:
        async with session.post(url, data=BODY) as r:
            await r.read()
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def _closed(url: str, concurrency: int, duration: float) -> dict:
    import aiohttp

    lat: list[float] = []
    errors = 0
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=conn, headers={"content-type": "application/json"}) as s:
        # warm-up: connections open, caches hot
        await asyncio.gather(*(s.post(url, data=BODY) for _ in range(concurrency)))
        end = time.perf_counter() + duration

        async def worker():
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                if await _post_ok(s, url):
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"rps": len(lat) / wall, "requests": len(lat), "errors": errors, **_pcts(lat)}


async def _open(url: str, rate: float, duration: float, seed: int = 0) -> dict:
    import aiohttp

    lat: list[float] = []
    late: list[float] = []
    errors = 0
    rng = random.Random(seed)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, headers={"content-type": "application/json"}) as s:
        await asyncio.gather(*(s.post(url, data=BODY) for _ in range(8)))

        async def one(due: float):
            nonlocal errors
            late.append(time.perf_counter() - due)
            t = time.perf_counter()
            if await _post_ok(s, url):
                lat.append(time.perf_counter() - t)
            else:
                errors += 1

        tasks, t = [], time.perf_counter()
        end = t + duration
        while t < end:
            now = time.perf_counter()
            if t > now:
                await asyncio.sleep(t - now)
            tasks.append(asyncio.create_task(one(t)))
            t += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return {"rate": rate, "requests": len(lat), "errors": errors, "sender_late_p99_ms": _pct(late, 0.99) * 1000,
            **_pcts(lat)}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def _pcts(lat: list[float]) -> dict:
    return {"p50_ms": _pct(lat, 0.5) * 1000, "p90_ms": _pct(lat, 0.9) * 1000, "p99_ms": _pct(lat, 0.99) * 1000}


def loadgen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=["closed", "open"], required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--duration", type=float, default=10)
    a = p.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    coro = _closed(a.url, a.concurrency, a.duration) if a.mode == "closed" else _open(a.url, a.rate, a.duration)
    print(json.dumps(asyncio.run(coro)))
    return 0


# -- orchestration ---------------------------------------------------------------------------------
def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up after {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _loadgen(url: str, mode: str, args) -> dict:
    cmd = [sys.executable, "-m", "lenpred.bench.router_overhead", "--loadgen", "--url", url, "--mode", mode,
           "--concurrency", str(args.concurrency), "--rate", str(args.rate), "--duration", str(args.duration)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=args.duration * 4 + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_s(proc: subprocess.Popen | None) -> float:
    """User + system CPU seconds of a target process and its children (0 for none)."""
    if proc is None:
        return 0.0
    p = psutil.Process(proc.pid)
    return sum(sum(q.cpu_times()[:2]) for q in [p, *p.children(recursive=True)])


def _start_target(name: str, backends: list[str], port: int, args, log) -> subprocess.Popen | None:
    if name == "lenpred":
        policy = args.policy or str(POLICY_DIR / "default.yaml")
        cmd = [sys.executable, "-m", "lenpred.router.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--backends", ",".join(backends), "--policy", policy, "--log-level", "warning"]
        return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=log)
    if name == "sglang-router":
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
               "--worker-urls", *backends, "--policy", "round_robin", "--log-level", "warn"]
        return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=log)
    return None


def _median_entry(name: str, rs: list[dict]) -> dict:
    """Median of each number over the rounds that succeeded (the machine is shared: rounds vary)."""
    ok = [r for r in rs if "closed" in r and "open" in r]
    if not ok:
        return {"target": name, "error": next((r.get("error") for r in rs if r.get("error")), "no result")}
    out: dict = {"target": name, "rounds": len(ok)}
    for phase in ("closed", "open"):
        out[phase] = {k: statistics.median(r[phase][k] for r in ok) for k in ok[0][phase]
                      if isinstance(ok[0][phase][k], (int, float))}
    return out


def gateway_available() -> str | None:
    try:
        import sglang_router  # noqa: F401
        from importlib.metadata import version
        return version("sglang-router")
    except Exception:  # noqa: BLE001
        return None


def render(result: dict) -> str:
    a = result["args"]
    rows = []
    direct = next((r for r in result["targets"] if r["target"] == "direct"), None)
    for r in result["targets"]:
        c, o = r.get("closed") or {}, r.get("open") or {}
        row = {"target": r["target"], "closed_rps": c.get("rps"), "cpu_us_per_request": c.get("cpu_us_per_request"),
               "closed_p50_ms": c.get("p50_ms"),
               "closed_p99_ms": c.get("p99_ms"), "open_p50_ms": o.get("p50_ms"), "open_p99_ms": o.get("p99_ms"),
               "errors": (c.get("errors") or 0) + (o.get("errors") or 0)}
        if direct and r is not direct and o and direct.get("open"):
            row["added_p50_ms"] = o["p50_ms"] - direct["open"]["p50_ms"]
            row["added_p99_ms"] = o["p99_ms"] - direct["open"]["p99_ms"]
        rows.append(row)
    cols = ["target", "closed_rps", "cpu_us_per_request", "closed_p50_ms", "closed_p99_ms", "open_p50_ms",
            "open_p99_ms", "added_p50_ms", "added_p99_ms", "errors"]
    lines = ["### `lenpred bench router` — router overhead (stub backends)", "",
             f"Command: `{result['command']}`", "",
             f"{a['backends']} stub backends (raw ASGI on uvicorn, one process); load generator in its own process "
             f"(aiohttp, keep-alive). Closed loop: {a['concurrency']} workers for {a['duration']} s. Open loop: "
             f"Poisson {a['rate']} req/s for {a['duration']} s; added = target minus direct at that rate. "
             f"{a['repeat']} interleaved round(s); medians over rounds. "
             f"Non-streamed chat completions, ~150-byte body, ~300-byte answer.",
             f"lenpred policy: `{result['lenpred_policy']}`; sglang-router: {result['gateway'] or 'not installed'} "
             "(policy round_robin).",
             f"Machine: {result['environment'].get('cpu_count', '?')} CPUs, load average at start "
             f"{result['loadavg_start']}, at end {result['loadavg_end']}.", "",
             report.markdown_table(rows, cols), ""]
    gw = next((r for r in result["targets"] if r["target"] == "sglang-router" and r.get("closed")), None)
    lp = next((r for r in result["targets"] if r["target"] == "lenpred" and r.get("closed")), None)
    if gw and lp:
        lines.append(f"lenpred / sglang-router req/s (medians): {lp['closed']['rps'] / gw['closed']['rps']:.0%} "
                     "(target >= 50%).")
        per = [a["closed"]["rps"] / b["closed"]["rps"] for a, b in zip(result.get("rounds", {}).get("lenpred", []),
                                                                     result.get("rounds", {}).get("sglang-router", []))
               if "closed" in a and "closed" in b]
        if len(per) > 1:
            lines.append("Per round: " + ", ".join(f"{x:.0%}" for x in per) + ".")
    for r in result["targets"]:
        if r.get("error"):
            lines.append(f"{r['target']}: {r['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--loadgen":
        return loadgen_main(argv[1:])
    p = argparse.ArgumentParser(prog="lenpred bench router", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", type=int, default=2)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=200.0, help="open-loop arrival rate (req/s)")
    p.add_argument("--targets", default="direct,lenpred,sglang-router")
    p.add_argument("--repeat", type=int, default=1, help="rounds over all targets (interleaved); medians reported")
    p.add_argument("--policy", default=None, help="lenpred policy file (default: the packaged default)")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)

    ports = [free_port() for _ in range(args.backends)]
    backends = [f"http://127.0.0.1:{q}" for q in ports]
    logdir = Path(args.json).parent if args.json else Path(".")
    logdir.mkdir(parents=True, exist_ok=True)
    log = open(logdir / "router_overhead.log", "ab")
    stub = subprocess.Popen([sys.executable, "-c", "import asyncio, uvloop, sys; uvloop.install(); "
                             "from lenpred.bench.router_overhead import serve_stubs; "
                             f"asyncio.run(serve_stubs({ports!r}))"], env=_env(), stdout=log, stderr=log)
    result = {"bench": "router", "args": vars(args), "environment": report.environment(),
              "command": "lenpred bench router " + " ".join(argv), "gateway": gateway_available(),
              "lenpred_policy": os.path.relpath(args.policy or str(POLICY_DIR / "default.yaml")),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "targets": []}
    try:
        for b in backends:
            _wait_http(b + "/health", proc=stub)
        names = args.targets.split(",")
        rounds: dict[str, list[dict]] = {n: [] for n in names}
        for k in range(args.repeat):
            for name in names:
                print(f"[router] round {k + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
                entry: dict = {"target": name}
                if name == "sglang-router" and not result["gateway"]:
                    entry["error"] = "sglang-router is not installed (pip install sglang-router)"
                    rounds[name].append(entry)
                    continue
                port = free_port()
                proc = _start_target(name, backends, port, args, log)
                url = backends[0] if proc is None else f"http://127.0.0.1:{port}"
                try:
                    if proc is not None:
                        _wait_http(url + ("/ready" if name == "lenpred" else "/health"), proc=proc)
                        time.sleep(1.0)
                    path = url + "/v1/chat/completions"
                    cpu0 = _cpu_s(proc)
                    entry["closed"] = _loadgen(path, "closed", args)
                    if proc is not None:
                        # CPU per request is what the router costs, and it is far less disturbed
                        # than req/s when the machine is shared
                        entry["closed"]["cpu_us_per_request"] = (_cpu_s(proc) - cpu0) / max(
                            entry["closed"]["requests"], 1) * 1e6
                    entry["open"] = _loadgen(path, "open", args)
                except Exception as e:  # noqa: BLE001 - report, go on with the next target
                    entry["error"] = f"{type(e).__name__}: {e}"
                finally:
                    if proc is not None:
                        _stop(proc)
                print(f"[router]   {json.dumps(entry)}", file=sys.stderr, flush=True)
                rounds[name].append(entry)
        result["rounds"] = rounds
        result["targets"] = [_median_entry(name, rs) for name, rs in rounds.items()]
    finally:
        _stop(stub)
        log.close()
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report.write(result, args.json, args.md, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The spine end to end on real weights: SmolLM2-135M-Instruct replicas with the tap, the real
sidecar (shipped heads) publishing real predictions to Redis, the real router in front, real
prompts (greedy, so both policies get the same answers). No injection here: what the router reads
is what the heads predicted from the engine's own hidden states. Reuses `lenpred bench
crosscheck`'s replay (streamed chat completions) and its event listener."""
from __future__ import annotations

import asyncio
import pathlib
import random
import statistics
import types

from lenpred.bench.crosscheck import EventTap, pick_prompts, replay, run_router, summarize
from lenpred.bench.real import engines as eng
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc
from lenpred.harness.redisproc import free_port
from lenpred.model import MODEL_ID

NAMESPACE = "smol"


def run(*, model: str, device: str, replicas: int, prompts_file: str, n: int, rate: float, max_tokens: int,
        policies: list[str], redis_url: str, log_dir: pathlib.Path, max_total_tokens: int, mem_fraction: float,
        seed: int = 0, startup_timeout: float = 300.0) -> dict:
    prompts = pick_prompts(prompts_file, n, seed, 1500)
    rng, t, offsets = random.Random(seed), 0.0, []
    for _ in prompts:
        offsets.append(t)
        t += rng.expovariate(rate)
    port = free_port()
    sidecar = spawn("smol-sidecar", lenpred_argv("sidecar", "--port", str(port), "--redis-url", redis_url,
                                                 "--namespace", NAMESPACE, "--device", device), log_dir)
    spec = eng.EngineSpec(model=model, device=device, max_total_tokens=max_total_tokens, mem_fraction=mem_fraction,
                          cuda_graph_bs=64, tap_every=8, model_id=MODEL_ID)
    engines: list = []
    out: dict = {"model": model, "replicas": replicas, "prompts": len(prompts), "rate_rps": rate,
                 "max_tokens": max_tokens, "engine": spec.describe(), "runs": []}
    try:
        wait_grpc(sidecar, f"127.0.0.1:{port}", 120)
        engines = eng.launch(spec, replicas, f"127.0.0.1:{port}", log_dir, "smol")
        out["startup_s"] = eng.wait(engines, startup_timeout)
        truth: dict[str, dict] = {}
        for k, pol in enumerate(policies):
            name = pathlib.Path(pol).stem
            events = EventTap(redis_url, NAMESPACE)
            router, url = run_router(pol, [e.url for e in engines], redis_url, NAMESPACE, log_dir, f"smol-router-{k}")
            try:
                rows = asyncio.run(replay(url, prompts, offsets, types.SimpleNamespace(max_tokens=max_tokens), None))
            finally:
                router.stop()
                events.close()
            for r in rows:
                first = events.first.get(r.get("rid") or "")
                r["pred"] = first["p50"] if first else None
                if r.get("status") == 200:
                    truth.setdefault(r["id"], {"true_len": r["tokens"], "pred": r["pred"]})
            out["runs"].append({**summarize(name, "real", rows),
                                "predicted": sum(1 for r in rows if r.get("pred") is not None)})
            eng.quiesce(engines)
        scored = [(min(v["pred"], max_tokens), v["true_len"]) for v in truth.values() if v["pred"] is not None]
        out["prediction_mae"] = statistics.fmean(abs(p - t) for p, t in scored) if scored else None
        out["predicted"], out["answered"] = len(scored), len(truth)
    except Exception as e:  # noqa: BLE001 — the caller records it and goes on with the main runs
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        eng.stop(engines)
        sidecar.stop()
    return out

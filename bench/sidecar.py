"""`lenpred bench sidecar`: sidecar throughput against a no-op gRPC bound measured in the same run.

Per configuration (hidden size, streams, processes, Redis on/off) a no-op Ingest server
(bench/noop.py, its own process(es), same message types and size limit) and then a real sidecar
(`lenpred sidecar`, its own process(es), random-weight EGTP + PLP heads) are driven by the same
client streams (bench/_client.py, one process each): R prefill + R decode rows per message, as a
tap sends per engine step, up to W messages in flight, for T seconds, over lenpred.v1 and/or v2.
Each result row carries `rows_per_s` (vector rows acked per second), `noop_rows_per_s` (the bound,
same wire, same client), their `ratio`, ack latency p50/p99, and with `--redis` the predictions
counted in Redis itself (HSET calls from INFO commandstats, after the write-behind drained).

    lenpred bench sidecar --device cpu --hidden 576 --streams 1 --wire v1,v2     # one configuration
    lenpred bench sidecar --matrix gpu --device cuda --seconds 6                 # the GPU line-rate run
    lenpred bench sidecar --matrix cpu --device cpu                              # the 2-core CPU run

Random weights are fine for speed; nothing here measures accuracy.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import pathlib
import sys
import tempfile
import time

import redis
import torch

from lenpred.bench import _client
from lenpred.bench.report import environment, markdown_table, write
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc
from lenpred.harness.redisproc import RedisServer, free_port
from lenpred.sidecar.heads import random_head, save_head
from lenpred.sidecar.server import head_dtype, pick_device

# (streams, processes, redis, wires) per row group; the GPU matrix: one stream first (the 60%-of-
# bound target), then node rows (processes > 1, many streams, Redis on: the 1M rows/s target).
MATRICES = {
    "gpu": {"hidden": 4096, "rows": 32, "groups": [(1, 1, False, ("v1", "v2")), (1, 1, True, ("v2",)),
                                                  (8, 4, True, ("v2",)), (16, 8, True, ("v2",))]},
    "cpu": {"hidden": 576, "rows": 32, "groups": [(1, 1, False, ("v1", "v2")), (1, 1, True, ("v2",))]},
}
OUT = {"gpu": "docs/results/sidecar_gpu_line_rate", "cpu": "docs/results/sidecar_cpu_line_rate"}


def head_forward_us(d: int, device: torch.device, dtype: torch.dtype, kind: str, batch: int, iters: int = 100) -> float:
    head = random_head(kind, d).to(device)
    head.net.to(dtype)
    x = torch.randn(batch, head.meta.input_dim, device=device)
    for _ in range(5):
        head.predict(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = head.predict(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del out
    return (time.perf_counter() - t0) / iters * 1e6


def drive(target: str, wire: str, model_id: str, d: int, streams: int, rows: int, window: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 2.0  # every client process imports before the clock starts
    procs = [ctx.Process(target=_client.stream, args=(target, wire, model_id, d, i, rows, window, start_at,
                                                      start_at + seconds, q)) for i in range(streams)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    lat = sorted(x for _, ls, _ in results for x in ls)
    errors = [e for _, _, e in results if e]
    done = sum(a for a, _, _ in results)
    return {"rows_per_s": done / seconds, "messages": len(lat),
            "ack_p50_ms": round(1e3 * lat[len(lat) // 2], 3) if lat else None,
            "ack_p99_ms": round(1e3 * lat[int(len(lat) * 0.99)], 3) if lat else None,
            "errors": errors}


def _hset_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_hset", {}).get("calls", 0))


def _wait_listening(child, n: int, timeout: float) -> None:
    """With --processes N every process prints its own 'listening' line once it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.log_tail(10_000).count("lenpred sidecar listening") >= n:
            return
        if not child.alive():
            break
        time.sleep(0.2)
    raise RuntimeError(f"{child.name}: {n} processes not listening after {timeout:.0f}s:\n{child.log_tail()}")


def run_group(a, d: int, rows: int, streams: int, processes: int, use_redis: bool, wires, device: torch.device,
              heads: pathlib.Path, logs: pathlib.Path, rsrv: RedisServer | None) -> list[dict]:
    model_id = f"bench/d{d}"
    tag = f"d{d}-s{streams}-p{processes}{'-redis' if use_redis else ''}"
    port = free_port()
    target = f"127.0.0.1:{port}"
    noop = spawn(f"noop-{tag}", [sys.executable, "-m", "lenpred.bench.noop", "--port", str(port),
                                 "--processes", str(processes)], logs)
    try:
        wait_grpc(noop, target, 60)
        time.sleep(0.5 if processes > 1 else 0)
        bound = {w: drive(target, w, model_id, d, streams, rows, a.window, a.seconds) for w in wires}
    finally:
        noop.stop()
    port = free_port()
    target = f"127.0.0.1:{port}"
    argv = ["sidecar", "--port", str(port), "--heads", str(heads), "--device", str(device),
            "--threads", str(a.threads), "--processes", str(processes), "--max-batch", str(a.max_batch),
            "--max-wait-us", str(a.max_wait_us), "--max-message-bytes", str(64 << 20), "--log-level", "WARNING",
            "--head-dtype", a.head_dtype, "--forward-thread", a.forward_thread]
    r = None
    if use_redis:
        argv += ["--redis-url", rsrv.url]
        r = redis.Redis.from_url(rsrv.url, socket_timeout=10)
        r.flushall()
        r.config_resetstat()
    sc = spawn(f"sidecar-{tag}", lenpred_argv(*argv), logs)
    out = []
    try:
        wait_grpc(sc, target, 180)
        _wait_listening(sc, processes, 180)
        for w in wires:
            before = _hset_calls(r) if r else 0
            res = drive(target, w, model_id, d, streams, rows, a.window, a.seconds)
            row = {"wire": w, "rows_per_s": round(res["rows_per_s"]), "noop_rows_per_s": round(bound[w]["rows_per_s"]),
                   "ratio": round(res["rows_per_s"] / bound[w]["rows_per_s"], 3) if bound[w]["rows_per_s"] else None,
                   "ack_p50_ms": res["ack_p50_ms"], "ack_p99_ms": res["ack_p99_ms"],
                   "noop_ack_p99_ms": bound[w]["ack_p99_ms"], "redis": use_redis, "processes": processes,
                   "streams": streams, "hidden": d, "device": str(device), "rows_per_message": 2 * rows,
                   "window": a.window, "seconds": a.seconds, "messages": res["messages"],
                   "errors": res["errors"] + bound[w]["errors"]}
            if r is not None:  # predictions counted in Redis itself, once the write-behind drained
                last, stable_since, began = -1, time.monotonic(), time.monotonic()
                while time.monotonic() - stable_since < 1.0 and time.monotonic() - began < 15:
                    n = _hset_calls(r)
                    if n != last:
                        last, stable_since = n, time.monotonic()
                    time.sleep(0.2)
                row["redis_predictions_stored"] = last - before
                row["redis_predictions_per_s"] = round((last - before) / a.seconds)
                row["redis_keys"] = r.dbsize()
            out.append(row)
            print(f"[bench sidecar] {row}", flush=True)
    finally:
        sc.stop()
        if r is not None:
            r.close()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench sidecar", description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", choices=sorted(MATRICES), default=None,
                    help="a fixed set of configurations (writes docs/results/sidecar_<matrix>_line_rate.json/.md "
                         "unless --json/--md are given); --hidden overrides its hidden size")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 576; matrix: its own)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--head-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--forward-thread", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of each sidecar process")
    ap.add_argument("--wire", default="v1,v2", help="wire versions to drive: v1, v2 or both")
    ap.add_argument("--streams", type=int, default=1, help="concurrent engine streams")
    ap.add_argument("--processes", type=int, default=1, help="sidecar (and no-op) processes on the port")
    ap.add_argument("--redis", action="store_true", help="end to end: a real Redis, predictions counted in it")
    ap.add_argument("--rows", type=int, default=32, help="prefill rows (and decode rows) per message")
    ap.add_argument("--window", type=int, default=None,
                    help="messages in flight per stream (default 8; a matrix: 16, as a tap streams without "
                         "waiting for acks)")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run (each row runs twice: "
                    "no-op and sidecar)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-wait-us", type=int, default=2000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    if a.window is None:
        a.window = 16 if a.matrix else 8
    if a.matrix:
        m = MATRICES[a.matrix]
        d, rows, groups = a.hidden or m["hidden"], m["rows"], m["groups"]
        a.json = a.json or OUT[a.matrix] + ".json"
        a.md = a.md or OUT[a.matrix] + ".md"
    else:
        d, rows = a.hidden or 576, a.rows
        groups = [(a.streams, a.processes, a.redis, tuple(a.wire.split(",")))]
    t0 = time.monotonic()
    results = []
    rsrv = RedisServer.start() if any(g[2] for g in groups) else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            heads = pathlib.Path(tmp) / "heads"
            heads.mkdir()
            for kind in ("egtp", "plp"):
                save_head(random_head(kind, d, model_id=f"bench/d{d}"), heads / f"{kind}.safetensors")
            for streams, processes, use_redis, wires in groups:
                results += run_group(a, d, rows, streams, processes, use_redis, wires, device, heads,
                                     pathlib.Path(tmp) / "logs", rsrv)
    finally:
        if rsrv is not None:
            rsrv.stop()
    hdt = head_dtype(a.head_dtype, device)
    fwd = {f"{k}_fwd_us_b{b}": round(head_forward_us(d, device, hdt, k, b), 1) for k in ("egtp", "plp") for b in (rows, 256)}
    result = {"benchmark": "sidecar_line_rate", "config": vars(a), "environment": environment(),
              "head_dtype": str(hdt).replace("torch.", ""), "head_forward": fwd,
              "wall_s": round(time.monotonic() - t0, 1), "results": results}
    cols = ["wire", "streams", "processes", "redis", "rows_per_s", "noop_rows_per_s", "ratio", "ack_p50_ms",
            "ack_p99_ms", "redis_predictions_per_s"]
    md = (f"## Sidecar line rate vs a same-run no-op gRPC bound ({environment().get('gpu') or 'CPU'}, device "
          f"{device}, d={d}, {rows} prefill + {rows} decode rows/message, window {a.window}, {a.seconds:g} s per run)\n\n"
          + markdown_table(results, cols)
          + f"\n\nHead forward alone ({str(hdt).replace('torch.', '')}, µs per call): "
          + ", ".join(f"{k} {v}" for k, v in fwd.items()) + f"\n\nWhole run: {result['wall_s']} s.\n")
    write(result, a.json, a.md, md)
    return 0

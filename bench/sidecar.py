"""`lenpred bench sidecar`: sidecar throughput and latency over real gRPC.

A real sidecar (`lenpred sidecar`, its own process) hosts random-weight EGTP + PLP heads at each
hidden size; S client streams (each in its own process, so clients don't share the server's GIL)
each send messages of R prefill + R decode rows (as a tap would
per engine step) with up to W messages in flight, for T seconds. Reports rows/s and per-message
ack latency (p50/p99), plus the head forward alone at batch 1/32/256. Random weights are fine for
speed; nothing here measures accuracy.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import pathlib
import statistics
import tempfile
import threading
import time

import grpc
import torch

from lenpred.contract import wire
from lenpred.bench.report import environment, markdown_table, write
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.harness.redisproc import free_port
from lenpred.sidecar.heads import random_head, save_head
from lenpred.sidecar.server import pick_device


def head_forward_us(d: int, device: torch.device, kind: str, batch: int, iters: int = 200) -> float:
    head = random_head(kind, d).to(device)
    x = torch.randn(batch, head.meta.input_dim, device=device)
    for _ in range(10):
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


def _stream(target: str, d: int, sid: int, rows: int, window: int, stop_at: float, out) -> None:
    head = pb.HeadSelector(model_id=f"bench/d{d}", hidden_size=d, layer=-1)
    vec = wire.encode(torch.randn(rows, d), torch.float16)
    sem = threading.Semaphore(window)
    sent_at: dict[int, float] = {}
    lat: list[float] = []
    accepted = 0

    def gen():
        seq = 0
        while time.time() < stop_at:
            sem.acquire()
            seq += 1
            b = pb.IngestBatch(head=head, seq=seq)
            b.prefill.rids.extend(f"s{sid}-{seq}-{i}" for i in range(rows))
            b.prefill.vectors.CopyFrom(vec)
            if seq > 1:  # decode rows for the previous step's requests (PLP)
                b.decode.rids.extend(f"s{sid}-{seq - 1}-{i}" for i in range(rows))
                b.decode.steps.extend([8] * rows)
                b.decode.vectors.CopyFrom(vec)
            sent_at[seq] = time.perf_counter()
            yield b

    with grpc.insecure_channel(target) as ch:
        for ack in pb_grpc.LengthPredictorStub(ch).Ingest(gen()):
            lat.append(time.perf_counter() - sent_at.pop(ack.seq))
            accepted += ack.accepted
            sem.release()
    out.put((accepted, lat))


def drive(target: str, d: int, streams: int, rows: int, window: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 3.0  # let every client process import before the clock starts
    procs = [ctx.Process(target=_stream, args=(target, d, i, rows, window, start_at + seconds, q))
             for i in range(streams)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    wall = time.time() - start_at
    lat = sorted(x for _, ls in results for x in ls)
    done = sum(a for a, _ in results)
    return {"rows_per_s": done / wall, "messages": len(lat),
            "ack_p50_ms": 1e3 * lat[len(lat) // 2] if lat else None,
            "ack_p99_ms": 1e3 * lat[int(len(lat) * 0.99)] if lat else None,
            "ack_mean_ms": 1e3 * statistics.fmean(lat) if lat else None}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench sidecar", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", default="576,4096", help="comma-separated hidden sizes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the sidecar")
    ap.add_argument("--streams", type=int, default=4, help="concurrent engine streams")
    ap.add_argument("--rows", type=int, default=32, help="prefill rows (and decode rows) per message")
    ap.add_argument("--window", type=int, default=4, help="messages in flight per stream")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--max-wait-us", type=int, default=2000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    rows = []
    for d in [int(x) for x in a.hidden.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("egtp", "plp"):
                save_head(random_head(kind, d, model_id=f"bench/d{d}"), f"{tmp}/{kind}.safetensors")
            port = free_port()
            sc = spawn(f"sidecar-d{d}", lenpred_argv(
                "sidecar", "--port", str(port), "--heads", tmp, "--device", str(device), "--threads", str(a.threads),
                "--max-batch", str(a.max_batch), "--max-wait-us", str(a.max_wait_us),
                "--max-message-bytes", str(64 << 20), "--log-level", "WARNING"), pathlib.Path(tmp))
            try:
                wait_grpc(sc, f"127.0.0.1:{port}", 120)
                r = drive(f"127.0.0.1:{port}", d, a.streams, a.rows, a.window, a.seconds)
            finally:
                sc.stop()
        fwd = {f"egtp_fwd_us_b{b}": head_forward_us(d, device, "egtp", b) for b in (1, 32, 256)}
        fwd.update({f"plp_fwd_us_b{b}": head_forward_us(d, device, "plp", b) for b in (1, 256)})
        rows.append({"hidden": d, "device": str(device), **r, **fwd})
    result = {"benchmark": "sidecar", "config": vars(a), "environment": environment(), "results": rows}
    cols = ["hidden", "device", "rows_per_s", "ack_p50_ms", "ack_p99_ms", "egtp_fwd_us_b1", "egtp_fwd_us_b256",
            "plp_fwd_us_b256"]
    md = (f"## Sidecar throughput ({environment().get('gpu', 'CPU')}; {a.streams} streams x {a.rows} prefill + "
          f"{a.rows} decode rows/message, window {a.window}, {a.seconds:.0f} s)\n\n" + markdown_table(rows, cols) + "\n")
    write(result, a.json, a.md, md)
    return 0

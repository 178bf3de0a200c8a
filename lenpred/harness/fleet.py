"""A whole lenpred deployment as real local processes, for fault injection and soak runs:
Redis, the real sidecar (CPU, random heads of a small width), N emulated SGLang engines (one
process each, so one can be killed or frozen), and the router; plus a tap stand-in that feeds the
sidecar (`Feeder`) and an open-loop client (`Load`) that records every request's outcome.

Every process can be killed (SIGKILL), frozen (SIGSTOP) and thawed (SIGCONT) by name; engines,
the sidecar and Redis can be restarted on their port. The engines are EMULATED
(lenpred.harness.emulator); everything else is the real component.
"""
from __future__ import annotations

import json
import os
import pathlib
import queue
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import httpx
import numpy as np
import psutil
import redis

from lenpred.bench._thread import write_random_heads
from lenpred.contract import wire
from lenpred.harness.procs import Child, lenpred_argv, spawn, wait_grpc, wait_http
from lenpred.harness.redisproc import RedisServer, free_port
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc

HIDDEN = 16
MODEL = "fleet/model"


@dataclass
class Fleet:
    """Handles of one running deployment; `start` builds it, `stop` ends every process."""

    workdir: pathlib.Path
    redis: RedisServer
    sidecar: Child
    sidecar_port: int
    engines: list[Child]
    engine_ports: list[int]
    router: Child
    router_port: int
    engine_args: list[str] = field(default_factory=list)
    heads: str = ""
    sidecar_args: list[str] = field(default_factory=list)

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def engine_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.engine_ports]

    @property
    def sidecar_target(self) -> str:
        return f"127.0.0.1:{self.sidecar_port}"

    @classmethod
    def start(cls, workdir: pathlib.Path, policy: str, engines: int = 2, engine_args: list[str] | None = None,
              router_args: list[str] | None = None, sidecar_args: list[str] | None = None) -> "Fleet":
        """Start everything and wait until the router has every engine in its pool."""
        workdir.mkdir(parents=True, exist_ok=True)
        heads = str(write_random_heads(workdir / "heads", HIDDEN, MODEL))
        rds = RedisServer.start()
        started: list = [rds]
        try:
            sc_port = free_port()
            sidecar = _start_sidecar(workdir, sc_port, rds.url, heads, sidecar_args or [])
            started.append(sidecar)
            ports = [free_port() for _ in range(engines)]
            args = list(engine_args or [])
            engs = []
            for i, p in enumerate(ports):
                engs.append(_start_engine(workdir, i, p, args))
                started.append(engs[-1])
            (workdir / "policy.yaml").write_text(policy)
            r_port = free_port()
            router = spawn("router", lenpred_argv(
                "router", "serve", "--host", "127.0.0.1", "--port", str(r_port),
                "--backends", ",".join(f"http://127.0.0.1:{p}" for p in ports), "--policy",
                str(workdir / "policy.yaml"), "--redis-url", rds.url, "--log-level", "warning",
                *(router_args or [])), workdir)
            started.append(router)
            fleet = cls(workdir, rds, sidecar, sc_port, engs, ports, router, r_port, args, heads,
                        list(sidecar_args or []))
            wait_grpc(sidecar, fleet.sidecar_target, 90)
            for e, url in zip(engs, fleet.engine_urls):
                wait_http(e, url + "/health", 30)
            wait_http(router, fleet.router_url + "/ready", 30)
            fleet.wait_pool(len(ports))
            return fleet
        except BaseException:
            for s in reversed(started):
                s.stop()
            raise

    # -- faults ----------------------------------------------------------------------------
    def pid(self, name: str) -> int:
        """`router`, `sidecar`, `redis` or `engine<i>`."""
        if name == "redis":
            return self.redis.proc.pid
        if name.startswith("engine"):
            return self.engines[int(name[6:])].proc.pid
        return getattr(self, name).proc.pid

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.pid(name), sig)

    def restart(self, name: str) -> None:
        """Start a killed engine, sidecar or Redis again on its port."""
        if name == "redis":
            self.redis.restart()
        elif name == "sidecar":
            self.sidecar.stop()
            self.sidecar = _start_sidecar(self.workdir, self.sidecar_port, self.redis.url, self.heads,
                                          self.sidecar_args)
            wait_grpc(self.sidecar, self.sidecar_target, 90)
        else:
            i = int(name[6:])
            self.engines[i].stop()
            self.engines[i] = _start_engine(self.workdir, i, self.engine_ports[i], self.engine_args)
            wait_http(self.engines[i], self.engine_urls[i] + "/health", 30)

    def health(self) -> dict:
        return httpx.get(self.router_url + "/health", timeout=5).json()

    def wait_pool(self, n: int, timeout: float = 20.0) -> None:
        """Until the router has `n` healthy replicas."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if sum(r["healthy"] for r in self.health()["replicas"].values()) == n:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the router's pool did not reach {n} healthy replicas: {self.health()['replicas']}")

    # -- measurements ------------------------------------------------------------------------
    def rss_mb(self, name: str) -> float:
        try:
            return psutil.Process(self.pid(name)).memory_info().rss / 2**20
        except psutil.Error:
            return float("nan")

    def redis_keys(self) -> int:
        r = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            return int(r.dbsize())
        finally:
            r.close()

    def stop(self) -> None:
        for name in ("router", "sidecar", "redis", *(f"engine{i}" for i in range(len(self.engines)))):
            try:
                self.signal(name, signal.SIGCONT)    # a frozen process cannot be stopped
            except (ProcessLookupError, OSError):
                pass
        self.router.stop()
        for e in self.engines:
            e.stop()
        self.sidecar.stop()
        self.redis.stop()


def _start_sidecar(workdir: pathlib.Path, port: int, redis_url: str, heads: str, args: list[str]) -> Child:
    return spawn("sidecar", lenpred_argv("sidecar", "--host", "127.0.0.1", "--port", str(port), "--redis-url",
                                         redis_url, "--heads", heads, "--device", "cpu", "--threads", "1",
                                         "--log-level", "WARNING", *args), workdir)


def _start_engine(workdir: pathlib.Path, i: int, port: int, args: list[str]) -> Child:
    return spawn(f"engine{i}", lenpred_argv("emulator", "--port", str(port), *args), workdir)


class Feeder:
    """The tap's part for emulated engines: for each rid given to `feed`, one prefill row (a random
    pooled vector) and, `finish_after_s` later, its finished row, over one gRPC Ingest stream to the
    sidecar, which then writes the prediction and the finished event to Redis. Reconnects when the
    sidecar is gone; drops rows when its queue is full (as the tap does)."""

    def __init__(self, target: str, finish_after_s: float = 0.5, max_queue: int = 10_000):
        self.target, self.finish_after_s = target, finish_after_s
        self.q: queue.Queue = queue.Queue(max_queue)
        self.sent = self.dropped = self.errors = 0
        self._stop = threading.Event()
        self._rng = np.random.default_rng(0)
        self.thread = threading.Thread(target=self._run, daemon=True, name="fleet-feeder")
        self.thread.start()

    def feed(self, rid: str, prompt_tokens: int = 16, output_tokens: int = 16) -> None:
        try:
            self.q.put_nowait((time.monotonic(), "prefill", rid, prompt_tokens, output_tokens))
        except queue.Full:
            self.dropped += 1

    def _batches(self):
        seq = 0
        later: list = []
        while not self._stop.is_set():
            try:
                item = self.q.get(timeout=0.05)
            except queue.Empty:
                item = None
            now = time.monotonic()
            due = [x for x in later if x[0] <= now]
            later = [x for x in later if x[0] > now]
            b = pb.IngestBatch(head=pb.HeadSelector(model_id=MODEL, hidden_size=HIDDEN, layer=-1), engine_id="fleet")
            if item is not None:
                _, _, rid, pt, out = item
                b.prefill.rids.append(rid)
                b.prefill.prompt_tokens.append(pt)
                b.prefill.vectors.CopyFrom(wire.encode(self._rng.standard_normal((1, HIDDEN), dtype=np.float32)))
                later.append((now + self.finish_after_s, rid, pt, out))
            for _, rid, pt, out in due:
                b.finished.append(pb.Finished(rid=rid, output_tokens=out, prompt_tokens=pt))
            if item is None and not due:
                continue
            seq += 1
            b.seq = seq
            self.sent += 1
            yield b

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with grpc.insecure_channel(self.target) as ch:
                    for _ in pb_grpc.LengthPredictorStub(ch).Ingest(self._batches()):
                        pass
            except grpc.RpcError:
                self.errors += 1
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


@dataclass
class Outcome:
    """What one client saw."""

    index: int
    stream: bool
    start: float                 # monotonic, client side
    status: int = 0
    ttfb: float | None = None    # to the first body byte
    max_gap: float = 0.0         # longest pause between body chunks
    elapsed: float = 0.0
    replica: str = ""
    rid: str = ""
    done: bool = False           # a stream ended with data: [DONE]
    sse_error: str = ""          # the error event a broken stream ended with
    error: str = ""              # no HTTP answer at all

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.sse_error and not self.error and (self.done or not self.stream)


class Load:
    """Open-loop client: `rate` requests/s (Poisson) of chat completions, a `stream_share` of them
    streamed, each asking for `tokens` output tokens; every outcome is kept. `on_rid` sees each
    rid as soon as its headers arrive (the feeder)."""

    def __init__(self, url: str, rate: float, *, stream_share: float = 0.5, tokens: tuple[int, int] = (10, 30),
                 client_timeout_s: float = 30.0, seed: int = 0, on_rid=None, workers: int = 64):
        self.url, self.rate, self.stream_share, self.tokens = url, rate, stream_share, tokens
        self.client_timeout_s, self.on_rid = client_timeout_s, on_rid
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self._pool = ThreadPoolExecutor(workers)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.thread: threading.Thread | None = None

    def _client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.url, timeout=self.client_timeout_s)
        return c

    def start(self) -> "Load":
        self.thread = threading.Thread(target=self._run, daemon=True, name="fleet-load")
        self.thread.start()
        return self

    def _run(self) -> None:
        i = 0
        nxt = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if nxt > now:
                time.sleep(min(nxt - now, 0.05))
                continue
            stream = self.rng.random() < self.stream_share
            n = self.rng.randint(*self.tokens)
            self._pool.submit(self._one, i, stream, n)
            i += 1
            nxt += self.rng.expovariate(self.rate)

    def _one(self, i: int, stream: bool, n: int) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": f"request {i}"}], "stream": stream,
                "max_tokens": n, "custom_params": {"emulated_output_len": n}}
        o = Outcome(i, stream, time.monotonic())
        try:
            with self._client().stream("POST", "/v1/chat/completions", json=body) as r:
                o.status, o.replica, o.rid = r.status_code, r.headers.get("x-lenpred-replica", ""), \
                    r.headers.get("x-lenpred-rid", "")
                if o.rid and self.on_rid is not None:
                    self.on_rid(o.rid, n)
                last = None
                text = b""
                for chunk in r.iter_raw():
                    now = time.monotonic()
                    if last is None:
                        o.ttfb = now - o.start
                    else:
                        o.max_gap = max(o.max_gap, now - last)
                    last = now
                    text += chunk
            if stream:
                o.done = b"data: [DONE]" in text
                for line in text.split(b"\n"):
                    if line.startswith(b"data: {") and b'"error"' in line:
                        o.sse_error = json.loads(line[6:])["error"]["message"]
            elif o.status != 200:
                o.sse_error = text[:300].decode(errors="replace")
        except httpx.HTTPError as e:
            o.error = f"{type(e).__name__}: {e}"
        o.elapsed = time.monotonic() - o.start
        with self._lock:
            self.outcomes.append(o)

    def stop(self) -> list[Outcome]:
        """Stop sending; wait for the requests in flight; every outcome, in sending order."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self._pool.shutdown(wait=True, cancel_futures=False)
        with self._lock:
            return sorted(self.outcomes, key=lambda o: o.index)

"""Bad input over real HTTP gets a clear status and the router keeps serving (issue #11's table):
limits on the body, the numbers the router reads, connections and their timing; a policy file that
cannot be read; malformed events and a frozen Redis; fake finished lengths. Emulated SGLang
backends, real Redis, the router on its real server (router/server.py) in a thread."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
import redis
import uvicorn

from lenpred.contract.keys import events_channel
from lenpred.harness.emulator import start_in_thread
from lenpred.harness.redisproc import RedisServer, free_port, redis_binary
from lenpred.router import server
from lenpred.router.app import make_app
from lenpred.router.config import RouterConfig
from tests.test_router_app import FAST, HEAD, chat, wait_for

POLICY = HEAD + """profiles:
  default: {}
limits: {max_body_bytes: 65536, body_timeout_s: 0.5, max_tokens: 100000, max_abs_priority: 1000,
         max_batch_requests: 4}
""" + FAST
LIMITS = server.ServerLimits(max_connections=40, header_timeout_s=0.5, idle_timeout_s=1.0)


class RouterThread:
    """The router app on its own server (router/server.py limits) in a thread."""

    def __init__(self, app, limits: server.ServerLimits = LIMITS):
        self.port = free_port()
        self.server = uvicorn.Server(server.config(app, "127.0.0.1", self.port, limits, log_level="warning",
                                                   lifespan="on", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10, what="router start")
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture()
def stack(tmp_path):
    """start(policy, redis_url=None, **emulator) -> (client, router thread, emulator, policy path)."""
    started = []

    def start(policy: str = POLICY, redis_url: str | None = None, **emu_cfg):
        emu = start_in_thread(**emu_cfg)
        started.append(emu)
        path = tmp_path / "policy.yaml"
        path.write_text(policy)
        rt = RouterThread(make_app(RouterConfig(backends=[emu.url], policy_path=str(path), redis_url=redis_url,
                                                reload_interval_s=0.1)))
        started.append(rt)
        client = httpx.Client(base_url=rt.url, timeout=10)
        wait_for(lambda: client.get("/ready").status_code == 200, what="replica in the pool")
        return client, rt, emu, path

    yield start
    for s in reversed(started):
        s.stop()


def raw(port: int, data: bytes, *, wait_s: float = 3.0) -> bytes:
    """Send raw bytes, read until the server closes the connection (or `wait_s`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def post_raw(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n").encode() + body


CHAT = "/v1/chat/completions"
BAD_BODIES = [
    # (name, path, body) -> 400
    ("not JSON", CHAT, b"{not json"),
    ("a JSON array", CHAT, b"[1, 2]"),
    ("NaN is not JSON", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}'),
    ("invalid UTF-8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("nested 30k deep", CHAT, b"[" * 30_000 + b"]" * 30_000),
    ("max_tokens 1e30", CHAT, json.dumps(chat(max_tokens=1e30)).encode()),
    ("max_tokens above the limit", CHAT, json.dumps(chat(max_tokens=10**9)).encode()),
    ("max_tokens a string", CHAT, json.dumps(chat(max_tokens="10")).encode()),
    ("max_tokens negative", CHAT, json.dumps(chat(max_tokens=-1)).encode()),
    ("max_completion_tokens a float", CHAT, json.dumps(chat(max_completion_tokens=5.5)).encode()),
    ("priority 1e30", CHAT, json.dumps(chat(priority=1e30)).encode()),
    ("priority above the limit", CHAT, json.dumps(chat(priority=10**9)).encode()),
    ("priority true", CHAT, json.dumps(chat(priority=True)).encode()),
    ("stream a string", CHAT, json.dumps(chat(stream="yes")).encode()),
    ("custom_params a list", CHAT, json.dumps({**chat(), "custom_params": [1]}).encode()),
    ("messages missing", CHAT, b'{"model": "m"}'),
    ("messages an object", CHAT, b'{"messages": {"role": "user"}}'),
    ("a message a number", CHAT, b'{"messages": [5]}'),
    ("content a number", CHAT, b'{"messages": [{"role": "user", "content": 5}]}'),
    ("content part text a number", CHAT, b'{"messages": [{"role": "user", "content": [{"text": 5}]}]}'),
    ("prompt a number", "/v1/completions", b'{"prompt": 5}'),
    ("prompt ids not ints", "/v1/completions", b'{"prompt": [1, "a"]}'),
    ("generate without text or ids", "/generate", b'{"sampling_params": {}}'),
    ("input_ids not ints", "/generate", b'{"input_ids": ["a"]}'),
    ("max_new_tokens 1e30", "/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": 1e30}}'),
    ("sampling_params a list", "/generate", b'{"text": "x", "sampling_params": [1]}'),
]


def test_bad_input_is_a_clear_status_never_a_500(stack):
    client, rt, emu, _ = stack()
    for name, path, body in BAD_BODIES:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
        assert r.json()["error"]["type"] == "invalid_request_error", name
    big = json.dumps(chat(text="x" * 70_000)).encode()
    assert client.post(CHAT, content=big).status_code == 413                       # Content-Length says so

    def chunks():
        for _ in range(20):
            yield b" " * 4096                                                       # no Content-Length
    assert client.post(CHAT, content=chunks()).status_code == 413
    batch = {"api": "chat", "requests": [chat()] * 5}
    assert client.post("/v1/lenpred/batch", json=batch).status_code == 413          # more than max_batch_requests
    assert client.post("/v1/lenpred/batch", json={"api": "chat", "requests": [{"messages": 1}]}).status_code == 400
    assert client.get(CHAT).status_code == 405 and client.post("/nope", json={}).status_code == 404
    assert emu and httpx.get(f"{emu.url}/emulator/requests").json()["received"] == []   # nothing reached the engine
    ok = client.post(CHAT, json=chat(3, max_tokens=3, priority=7))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    metrics = client.get("/metrics").text
    assert 'lenpred_router_refused_total{code="400"}' in metrics and 'lenpred_router_requests_total' in metrics


CONNECTION_CASES = [
    # (name, bytes sent, expected status line prefix) — the server answers and closes
    ("headers never finished", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n", b"HTTP/1.1 408"),
    ("body never finished", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{",
     b"HTTP/1.1 408"),
    ("bad Content-Length", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
     b"HTTP/1.1 400"),
    ("headers too large", b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",
     b"HTTP/1.1 400"),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), b"HTTP/1.1 400"),
    ("idle: nothing sent", b"", b"HTTP/1.1 408"),
]


@pytest.mark.parametrize("name,data,expected", CONNECTION_CASES, ids=[c[0] for c in CONNECTION_CASES])
def test_slow_idle_and_broken_connections_are_answered_and_closed(stack, name, data, expected):
    client, rt, _, _ = stack()
    t0 = time.monotonic()
    out = raw(rt.port, data)
    assert out.startswith(expected), (name, out[:200])
    assert time.monotonic() - t0 < 2.5          # closed by the server well before the client gave up
    assert client.post(CHAT, json=chat(2)).status_code == 200


def test_connections_beyond_the_limit_are_refused_and_idle_ones_closed(stack):
    client, rt, _, _ = stack()
    socks = [socket.create_connection(("127.0.0.1", rt.port)) for _ in range(LIMITS.max_connections + 5)]
    try:
        refused = 0
        for s in socks[-5:]:
            s.settimeout(2)
            if s.recv(100).startswith(b"HTTP/1.1 503"):
                refused += 1
        assert refused == 5
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: httpx.get(f"{rt.url}/health").status_code == 200, what="closed connections gone")
    # keep-alive connections idle past idle_timeout_s are closed by the server
    with socket.create_connection(("127.0.0.1", rt.port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        while s.recv(65536):
            pass
        assert time.monotonic() - t0 < LIMITS.idle_timeout_s + 1.5
    assert client.post(CHAT, json=chat(2)).status_code == 200


def test_policy_reload_survives_any_bad_file_and_shows_it(stack):
    client, rt, _, path = stack()

    def rewrite(data: bytes) -> None:
        path.write_bytes(data)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))

    good = path.read_bytes()
    for bad, says in ((good.replace(b"profiles:", b"profiles:\xff"), "not UTF-8"),
                      (b"apiVersion: [", "invalid YAML"),
                      (good + b"bogus: 1\n", "Extra inputs")):
        rewrite(bad)
        wait_for(lambda: says in (client.get("/health").json()["policy_error"] or ""), what=says)
        assert client.post(CHAT, json=chat(2)).status_code == 200          # the last good policy serves
    path.unlink()
    wait_for(lambda: "cannot read file" in (client.get("/health").json()["policy_error"] or ""), what="missing")
    rewrite(good.replace(b"max_batch_requests: 4", b"max_batch_requests: 5"))
    wait_for(lambda: client.get("/health").json()["policy_error"] is None, what="valid again")
    metrics = client.get("/metrics").text
    assert 'lenpred_router_policy_reloads_total{result="invalid"} 4.0' in metrics
    assert "lenpred_router_policy_invalid 0.0" in metrics
    assert client.get("/health").json()["background_tasks"]["policy-reload"] == "running"


def test_malformed_events_are_skipped_and_frozen_redis_shows_down(stack, tmp_path):
    srv = RedisServer.start()
    try:
        client, rt, _, _ = stack(redis_url=srv.url)
        wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")
        r = redis.Redis.from_url(srv.url)
        ch = events_channel("default")
        bad = [b"5", b"{}", b"[1]", b'{"type": "prediction", "rid": 1}', b'{"type": "prediction", "p50": "nan"}',
               b"\xff\xfe", b'{"type": "finished", "output_tokens": "x"}', b'"str"', b"null"]
        for m in bad:
            r.publish(ch, m)
        # the follower is still alive: a request streamed now gets its pushed prediction
        with client.stream("POST", CHAT, json=chat(200, stream=True)) as s:
            rid = s.headers["x-lenpred-rid"]
            rec = {"type": "prediction", "rid": rid, "p50": 42.0, "p90": 60.0, "mean": 42.0, "remaining_p50": 42.0,
                   "remaining_p90": 60.0, "step": 0, "source": "egtp", "head_version": "t", "ts": time.time()}
            r.publish(ch, json.dumps(rec))
            wait_for(lambda: client.get(f"/v1/lenpred/requests/{rid}").json()["router"]["estimate"]["source"] == "egtp",
                     what="prediction after the bad events")
        health = client.get("/health").json()
        assert health["redis_events_malformed"] == len(bad) - 1     # a malformed finished event is ignored, not counted
        assert health["background_tasks"]["redis-events"] == "running"
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert client.get("/health", timeout=3).json()["redis"] == "disconnected"   # a real round trip
            assert time.monotonic() - t0 < 1.5
            assert client.post(CHAT, json=chat(2)).status_code == 200                   # never fails a request
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        wait_for(lambda: client.get("/health").json()["redis"] == "connected", timeout=8, what="back")
        r.close()
    finally:
        srv.stop()


def test_fake_finished_lengths_do_not_poison_the_fallback(stack, redis_url):
    client, rt, _, _ = stack(redis_url=redis_url)
    wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="subscription")
    r = redis.Redis.from_url(redis_url)
    ch = events_channel("default")
    for n in (4_000_000_000, 10**12, -5, 200_000):                 # above the ceiling, negative
        for _ in range(30):
            r.publish(ch, json.dumps({"type": "finished", "rid": "x", "output_tokens": n, "prompt_tokens": 3}))
    for _ in range(30):                                            # above the event's own max_new_tokens
        r.publish(ch, json.dumps({"type": "finished", "rid": "x", "output_tokens": 900, "prompt_tokens": 3,
                                  "max_new_tokens": 100}))
    wait_for(lambda: "lenpred_router_lengths_ignored_total 150.0" in client.get("/metrics").text, what="ignored")
    g = client.post("/generate", json={"text": "abc", "sampling_params": {"max_new_tokens": 100000},
                                       "custom_params": {"emulated_output_len": 4}})
    assert g.status_code == 200 and "p50=256;" in g.headers["x-lenpred-prediction"]   # still the default estimate
    r.close()


@pytest.mark.parametrize("password,state", [("s3cret-pass", "connected"), ("wrong", "disconnected")])
def test_redis_auth_password_from_the_environment(stack, monkeypatch, tmp_path, password, state):
    """AUTH through lenpred/contract/redisconf.py: the URL has no password, LENPRED_REDIS_PASSWORD does."""
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--requirepass", "s3cret-pass", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        monkeypatch.setenv("LENPRED_REDIS_PASSWORD", password)
        client, *_ = stack(redis_url=f"redis://127.0.0.1:{port}/0")
        if state == "connected":
            wait_for(lambda: client.get("/health").json()["redis"] == "connected", what="AUTH accepted")
        else:
            time.sleep(1.0)
            assert client.get("/health").json()["redis"] == "disconnected"
        assert client.post(CHAT, json=chat(2)).status_code == 200
    finally:
        proc.kill()
        proc.wait()

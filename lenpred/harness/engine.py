"""DEV/TEST/DEMO launcher: one real SGLang 0.5.23 server on CPU, serving the shipped model with the
lenpred tap loaded through its entry-point plugin.

This is NOT the production path. In production users run SGLang on GPUs themselves, unmodified,
with `pip install lenpred[sglang]` and a few flags (docs/TAP.md). Here, to make real SGLang serve on
a CPU-only machine, the launcher adds one dev-only shim: `lenpred/harness/_cpu_stub/sitecustomize.py` on
PYTHONPATH (with LENPRED_CPU_STUB=1), which stubs `sgl_kernel.load_utils` — the module that dlopens
sgl-kernel's CUDA library — so that `import sgl_kernel` succeeds without libcuda; SGLang then runs
its own plain-torch CPU paths (SGLANG_USE_CPU_ENGINE=1). See ../shared/notes/sglang-on-cpu.md.

    from lenpred.harness.engine import start_engine
    eng = start_engine(30000, "127.0.0.1:50061", log_path="/tmp/sglang.log")
    ... eng.url ...
    eng.stop()

CLI: `lenpred engine --port 30000 --sidecar 127.0.0.1:50061 [-- extra sglang args]`.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

STUB_DIR = pathlib.Path(__file__).resolve().parent / "_cpu_stub"

# Flags the tap needs on any device: hidden states of every computed token are captured server-wide
# (no request asks for them, so SGLang never copies them to the host itself).
TAP_FLAGS = ("--return-hidden-states-mode", "full")

# CPU-only flags (SGLang's plain-torch CPU path).
CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
             "--sleep-on-idle")


class EngineError(RuntimeError):
    """The SGLang server did not come up; the message carries the tail of its log."""


def _tail(path: pathlib.Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


@dataclass
class EngineProcess:
    port: int
    proc: subprocess.Popen
    log_path: pathlib.Path
    cmd: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        return _tail(self.log_path, n)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group (HTTP server, scheduler, detokenizer), then SIGKILL."""
        if self.proc.poll() is not None:
            return
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # children may outlive the leader briefly; make sure the group is gone
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def engine_env(sidecar: str, env: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e.update({
        "SGLANG_USE_CPU_ENGINE": "1",
        "LENPRED_CPU_STUB": "1",
        "OMP_NUM_THREADS": e.get("LENPRED_ENGINE_THREADS", "1"),
        "MKL_NUM_THREADS": e.get("LENPRED_ENGINE_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "SGLANG_PLUGINS": "lenpred_tap",
        "LENPRED_SIDECAR": sidecar,
    })
    pp = [str(STUB_DIR)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])
    e["PYTHONPATH"] = os.pathsep.join(pp)
    if env:
        e.update(env)
    return e


def engine_cmd(port: int, model_path: str, *, host: str = "127.0.0.1", mem_fraction: float = 0.3,
               max_total_tokens: int = 20000, extra_args=()) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
            "--host", host, "--port", str(port), *CPU_FLAGS,
            "--mem-fraction-static", str(mem_fraction), "--max-total-tokens", str(max_total_tokens),
            *TAP_FLAGS, *extra_args]


def wait_healthy(eng: EngineProcess, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not eng.alive():
            raise EngineError(f"SGLang exited with code {eng.proc.returncode} before becoming healthy "
                              f"(log {eng.log_path}):\n{eng.log_tail()}")
        try:
            with urllib.request.urlopen(eng.url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(1.0)
    eng.stop()
    raise EngineError(f"SGLang not healthy at {eng.url} within {timeout:.0f}s (last: {last}; "
                      f"log {eng.log_path}):\n{eng.log_tail()}")


def start_engine(port: int, sidecar: str, *, log_path, extra_args=(), env: dict[str, str] | None = None,
                 model_path: str | None = None, host: str = "127.0.0.1", timeout: float = 240.0,
                 mem_fraction: float = 0.3, max_total_tokens: int = 20000) -> EngineProcess:
    """Start one real SGLang server on CPU with the tap; return once `/health` answers 200.
    Raises EngineError (with the tail of the server log) when it exits or times out."""
    if model_path is None:
        from lenpred.model import hf_checkpoint

        model_path = str(hf_checkpoint())
    log_path = pathlib.Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = engine_cmd(port, model_path, host=host, mem_fraction=mem_fraction,
                     max_total_tokens=max_total_tokens, extra_args=list(extra_args))
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=engine_env(sidecar, env), start_new_session=True)
    eng = EngineProcess(port=port, proc=proc, log_path=log_path, cmd=cmd, host=host)
    try:
        wait_healthy(eng, timeout)
    except BaseException:
        eng.stop()
        raise
    return eng


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="lenpred engine",
        description="DEV/TEST: run one real SGLang server on CPU with the lenpred tap "
                    "(production: run SGLang yourself on GPUs, see docs/TAP.md). "
                    "Arguments after `--` go to sglang.launch_server.")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--sidecar", default="127.0.0.1:50061", help="host:port of the lenpred sidecar")
    ap.add_argument("--model-path", default=None, help="HF checkpoint dir (default: the shipped SmolLM2)")
    ap.add_argument("--log", default=None, help="server log file (default: stdout of this command)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for /health")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    log_path = a.log or f"/tmp/lenpred-engine-{a.port}.log"
    try:
        eng = start_engine(a.port, a.sidecar, log_path=log_path, extra_args=extra, host=a.host,
                           model_path=a.model_path, timeout=a.timeout)
    except EngineError as e:
        print(f"lenpred engine: {e}", file=sys.stderr)
        return 1
    print(f"lenpred engine: SGLang serving at {eng.url} (tap -> {a.sidecar}; log {log_path}); Ctrl-C stops",
          flush=True)
    try:
        while eng.alive():
            time.sleep(1.0)
        print(f"lenpred engine: SGLang exited with {eng.proc.returncode}:\n{eng.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        eng.stop()


if __name__ == "__main__":
    sys.exit(main())

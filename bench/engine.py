"""`lenpred bench engine`: what the tap costs inside real SGLang — the same workload against vanilla
SGLang and tap variants, in one run, interleaved, warmed per shape, repeated.

All variants are started at once (each its own SGLang server and port; on a GPU they share it, each
with `--mem-fraction-static`), then for every repetition the variants take turns — in a rotated
order, so none always runs first or last — on each shape:
  prefill   N prompts of L random token ids, max_new_tokens 1, all at once (tokens/s of prompt)
  decode    M prompts of 64 tokens, T output tokens each with ignore_eos, all at once (tokens/s out)
Prompts are fresh random ids per (repetition, shape), identical across variants, so the radix cache
(left on, as in production) never hits and every variant sees the same work. TTFT and TPOT
percentiles come from each server's own Prometheus histograms (`--enable-metrics`), differenced
around each measured run. A counting gRPC sink stands in for the sidecar, so the measurement is the
engine side only; the tap's rows per variant and the errors in its log are reported with the
throughput. Ratios are to vanilla in the same run; the headline is the median over repetitions.

Runs on a GPU (the real measurement) and on CPU (small; what CI runs): on CPU the servers use
lenpred's dev launcher (`lenpred.harness.engine`). Everything here is a measurement harness; the tap
itself is configured only through its environment variables (docs/TAP.md).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from lenpred.bench.report import environment, markdown_table, write
from lenpred.harness.engine import CPU_FLAGS, EngineProcess, engine_env, wait_healthy
from lenpred.harness.recorder import RecordingSidecar
from lenpred.harness.redisproc import free_port


@dataclass(frozen=True)
class Variant:
    label: str
    env: dict[str, str]
    flags: tuple[str, ...]
    tap: bool


NO_PLUGINS = {"SGLANG_PLUGINS": "lenpred-bench-no-plugin"}  # a whitelist that matches nothing
VARIANTS = {
    "vanilla": Variant("vanilla", NO_PLUGINS, (), False),
    # SGLang's own hidden-state capture alone (no plugin): the floor the tap builds on
    "flag-full": Variant("flag-full", NO_PLUGINS, ("--return-hidden-states-mode", "full"), False),
    # the tap as shipped: entropy pool on (vocabulary-slice entropy), prefix store, k=8
    "tap": Variant("tap", {"SGLANG_PLUGINS": "lenpred_tap"}, ("--return-hidden-states-mode", "full"), True),
    # the tap with the pool off: last prompt token only, SGLang captures one row per request
    "tap-pool-off": Variant("tap-pool-off", {"SGLANG_PLUGINS": "lenpred_tap", "LENPRED_TAP_POOL": "0"},
                            ("--return-hidden-states-mode", "last"), True),
    # the pool with exact full-vocabulary entropies (what the slice saves)
    "tap-exact-entropy": Variant("tap-exact-entropy",
                                 {"SGLANG_PLUGINS": "lenpred_tap", "LENPRED_TAP_ENTROPY_VOCAB": "0"},
                                 ("--return-hidden-states-mode", "full"), True),
}
HISTOGRAMS = {"ttft": "sglang:time_to_first_token_seconds",
              "tpot": "sglang:request_time_per_output_token_seconds"}


@dataclass
class Shape:
    name: str
    requests: int
    prompt_len: int
    output_len: int

    @property
    def tokens(self) -> int:
        """The tokens this shape's throughput counts: prompt tokens (prefill) or output tokens."""
        return self.requests * (self.prompt_len if self.name == "prefill" else self.output_len)


@dataclass
class Server:
    variant: Variant
    eng: EngineProcess
    samples: dict[str, list[dict]] = field(default_factory=dict)


def parse_shape(name: str, text: str, output_len: int | None = None) -> Shape:
    """'32x2048' -> Shape(prefill, 32 requests, 2048-token prompts); decode: 'MxT' = M requests of T
    output tokens (64-token prompts)."""
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--{name} must look like 32x2048, got {text!r}")
    a, b = int(m[1]), int(m[2])
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"--{name}: both numbers must be >= 1, got {text!r}")
    return Shape(name, a, b, 1) if name == "prefill" else Shape(name, a, 64, b)


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def scrape(url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts {metric: {le: count}} summed over label sets."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[float, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in HISTOGRAMS.values():
            continue
        buckets = out.setdefault(fam.name, {})
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return out


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """q-quantile (seconds) of the observations made between two scrapes of one histogram,
    interpolated linearly inside the bucket (Prometheus' histogram_quantile)."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-12))
        prev_le, prev_c = le, c
    return prev_le


def requests_for(shape: Shape, seed: int, vocab: int) -> list[dict]:
    rnd = random.Random(seed)
    return [{"input_ids": [rnd.randrange(100, vocab) for _ in range(shape.prompt_len)],
             "sampling_params": {"max_new_tokens": shape.output_len, "ignore_eos": True, "temperature": 0}}
            for _ in range(shape.requests)]


def measure(server: Server, shape: Shape, reqs: list[dict], timeout: float) -> dict:
    url = server.eng.url
    before = scrape(url)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        outs = list(ex.map(lambda b: post(url + "/generate", b, timeout), reqs))
    wall = time.perf_counter() - t0
    after = scrape(url)
    got = sum(int(o.get("meta_info", {}).get("completion_tokens", 0)) for o in outs)
    expected = shape.requests * shape.output_len
    if got != expected:
        raise RuntimeError(f"{server.variant.label}: {got} output tokens, expected {expected}")
    row = {"wall_s": round(wall, 4), "tok_s": round(shape.tokens / wall, 1)}
    for key, metric in HISTOGRAMS.items():
        for q in (0.5, 0.99):
            v = quantile(before.get(metric, {}), after.get(metric, {}), q)
            row[f"{key}_p{int(q * 100)}_ms"] = None if v is None else round(v * 1e3, 3)
    return row


def launch_server(label: str, env: dict[str, str], flags, a, sink: str, log_dir: pathlib.Path,
                  server_args) -> EngineProcess:
    """Start one SGLang server (not waiting for it): `a.model`, `a.device`, `a.mem_fraction`."""
    port = free_port()
    log = log_dir / f"server_{label}.log"
    common = ["--model-path", a.model, "--host", "127.0.0.1", "--port", str(port), "--enable-metrics",
              "--mem-fraction-static", str(a.mem_fraction), *flags]
    if a.device == "cpu":
        env = engine_env(sink, {**env, "LENPRED_TAP_LOG_EVERY_S": "5"})
        cmd = [sys.executable, "-m", "sglang.launch_server", *common, *CPU_FLAGS, "--max-total-tokens", "20000",
               *server_args]
    else:
        env = dict(os.environ, LENPRED_SIDECAR=sink, LENPRED_TAP_LOG_EVERY_S="5", **env)
        cmd = [sys.executable, "-m", "sglang.launch_server", *common, "--sleep-on-idle", *server_args]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    return EngineProcess(port=port, proc=proc, log_path=log, cmd=cmd)


def stop_all(engines) -> None:
    """Stop servers in parallel (each waits up to 20 s for a graceful exit)."""
    engines = list(engines)
    if engines:
        with cf.ThreadPoolExecutor(len(engines)) as ex:
            list(ex.map(lambda e: e.stop(), engines))


def tap_log(eng: EngineProcess) -> dict:
    text = eng.log_path.read_text(errors="replace")
    stats = re.findall(r"lenpred tap stats: (.*)", text)
    return {"tap_errors_logged": len(re.findall(r"lenpred tap: error in", text)),
            "tap_last_stats": stats[-1][:2000] if stats else None}


def summarize(servers: list[Server], shapes: list[Shape], sink: RecordingSidecar) -> list[dict]:
    rows = []
    base = {s.name: statistics.median(x["tok_s"] for x in servers[0].samples[s.name]) for s in shapes}
    for srv in servers:
        row: dict = {"label": srv.variant.label}
        for s in shapes:
            xs = srv.samples[s.name]
            med = statistics.median(x["tok_s"] for x in xs)
            row[f"{s.name}_tok_s"] = round(med)
            row[f"{s.name}_vs_vanilla"] = round(med / base[s.name], 4)
            row[f"{s.name}_reps_tok_s"] = [x["tok_s"] for x in xs]
            for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"):
                vals = [x[k] for x in xs if x.get(k) is not None]
                row[f"{s.name}_{k}"] = round(statistics.median(vals), 3) if vals else None
        if srv.variant.tap:
            counts = [c for eid, c in sink.counts.items() if eid.split("/")[0].endswith(f":{srv.eng.port}")]
            row["tap_rows"] = counts[0] if counts else {}
            row.update(tap_log(srv.eng))
        rows.append(row)
    return rows


def render(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    cols = ["label", "prefill_tok_s", "prefill_vs_vanilla", "decode_tok_s", "decode_vs_vanilla",
            "prefill_ttft_p50_ms", "decode_ttft_p99_ms", "decode_tpot_p50_ms", "decode_tpot_p99_ms"]
    where = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores)"
    lines = [f"## Tap cost inside real SGLang {env.get('sglang')} ({where}, cuda_graph={env.get('cuda_graph')})",
             "", f"Model `{cfg['model']}`, prefill {cfg['prefill']}, decode {cfg['decode']}, "
             f"{cfg['reps']} repetitions (median), variants interleaved in rotated order.", "",
             markdown_table(result["results"], cols), ""]
    for r in result["results"]:
        if "tap_rows" in r:
            lines.append(f"- `{r['label']}`: tap rows {r['tap_rows']}, errors logged {r['tap_errors_logged']}")
    return "\n".join(lines) + "\n"


def resolve_target(a: argparse.Namespace) -> None:
    """`--device auto` -> cuda when there is one; no `--model` -> the shipped SmolLM2 (converted once).
    torch and the model loader are imported only here: `--help` and bad arguments stay instant."""
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.model is None:
        from lenpred.model import hf_checkpoint

        a.model = str(hf_checkpoint())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=False, default=None,
                    help="model dir (default: the shipped SmolLM2 checkpoint)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--variants", default="vanilla,tap,tap-pool-off",
                    help=f"comma-separated, first is the baseline; known: {', '.join(VARIANTS)}")
    ap.add_argument("--prefill", default="32x2048", help="NxL: N prompts of L tokens, 1 output token")
    ap.add_argument("--decode", default="128x256", help="MxT: M requests of T output tokens")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn below this")
    ap.add_argument("--mem-fraction", type=float, default=0.25, help="--mem-fraction-static per server")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request and per server start")
    ap.add_argument("--log-dir", default=None, help="server logs (default: next to --json, else /tmp)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("server_args", nargs="*", help="after `--`: extra sglang.launch_server arguments")
    a = ap.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    shapes = [parse_shape("prefill", a.prefill), parse_shape("decode", a.decode)]
    resolve_target(a)
    log_dir = pathlib.Path(a.log_dir or (pathlib.Path(a.json).parent if a.json else "/tmp/lenpred-bench-engine"))
    log_dir.mkdir(parents=True, exist_ok=True)

    sink = RecordingSidecar(keep=False)
    servers: list[Server] = []
    try:
        engines = [launch_server(n, VARIANTS[n].env, VARIANTS[n].flags, a, sink.target, log_dir, a.server_args)
                   for n in names]  # start all at once
        for n, eng in zip(names, engines):
            servers.append(Server(VARIANTS[n], eng))
        for srv in servers:
            wait_healthy(srv.eng, a.timeout)
        print(f"bench engine: {len(servers)} servers up", flush=True)
        for rep in range(-1, a.reps):  # rep -1 = warm-up of every shape on every server
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for si, shape in enumerate(shapes):
                reqs = requests_for(shape, seed=1000 * (rep + 2) + si, vocab=a.vocab)
                for srv in order:
                    row = measure(srv, shape, reqs, a.timeout)
                    if rep >= 0:
                        srv.samples.setdefault(shape.name, []).append(row)
                    print(f"  rep {rep:>2} {shape.name:<7} {srv.variant.label:<18} {row['tok_s']:>10.1f} tok/s",
                          flush=True)
        time.sleep(6)  # one more tap stats line in every log
        rows = summarize(servers, shapes, sink)
    finally:
        stop_all(srv.eng for srv in servers)
        sink.stop()
    env = environment()
    import sglang

    env.update(sglang=sglang.__version__, device=a.device,
               cuda_graph=a.device == "cuda" and "--disable-cuda-graph" not in a.server_args)
    result = {"benchmark": "engine", "config": {k: v for k, v in vars(a).items()}, "environment": env,
              "results": rows}
    write(result, a.json, a.md, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

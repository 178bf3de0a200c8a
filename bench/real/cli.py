"""`lenpred bench schedule-real`: router policies on REAL SGLang replicas, one command.

R real SGLang 0.5.23 replicas (on a GPU: an 8B-shaped Llama with dummy weights; on CPU: SmolLM2)
with the lenpred tap, a real Redis, the real router (`lenpred router serve`, one process per
policy), and a length trace replayed with exact output lengths (`lenpred.harness.lengthctl`: the
router and SGLang see only a generic cap). Predictions are INJECTED (`lenpred.harness.inject`): a
gRPC server on the tap's stream publishes true length x the served head's measured error, in the
sidecar's Redis format. Optionally (`--smol-model`) the spine runs end to end on real weights first:
SmolLM2 replicas, the real sidecar, real predictions.

Runs, most important first (each only if it fits in `--budget-s`; results are rewritten after
every run, so a command cut short still leaves the finished ones):
  batch   vanilla (batch-rl-fcfs: round robin, all at once); its steady completion rate is the
          saturation rate of the online runs unless `--rate` is given
  online  at saturation: round-robin, least-load, SGLang priority (round robin + SGLang
          `--enable-priority-scheduling`, priority = shortest prompt first in log2 size classes: the
          only length signal a client has without lenpred), the first `--policy` (lenpred,
          injected predictions; default predicted.yaml)
  batch   LPT (batch-rl-lpt: probe, longest predicted first), injected and oracle
  online  round-robin and the first `--policy` at `--over` x saturation
  online  the other `--policy` files (default predicted-slo.yaml); the first with oracle lengths
Goodput's SLO: TTFT <= `--slo-ttft-s` and TPOT <= `--slo-tpot-ms`, default 1.5 x the round-robin
run's median TPOT (set by the baseline, the same for every policy); a grid of other SLOs is in the
JSON.

    lenpred bench schedule-real prepare --sharegpt ../shared/data/sharegpt/first_turn.jsonl \\
        --tokenizer DIR --out runs/sharegpt-lengths.json --prompts-out runs/e2e-prompts.jsonl
    lenpred bench schedule-real --device cuda --model DIR --replicas 4 --trace lengths:runs/sharegpt-lengths.json ...
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

from lenpred.bench import report
from lenpred.bench.crosscheck import run_router
from lenpred.bench.real import e2e, engines as eng, replay, summary, workload as wl
from lenpred.bench.schedule import _metric
from lenpred.harness.inject import ErrorModel, InjectingSidecar, Item
from lenpred.harness.redisproc import RedisServer

POLICY_DIR = pathlib.Path(__file__).resolve().parents[2] / "router" / "policies"
NAMESPACE = "bench"
CONTEXT = 8192        # both models' context length: a cap + prompt above it (or above the KV pool) is clamped
WARMUP_ITEMS = 8


@dataclass
class Run:
    mode: str              # online | batch
    label: str
    policy: str
    predictions: str       # none (baselines: predictions flow, the policy ignores them) | injected | oracle
    rate_factor: float = 1.0
    priority: bool = False  # SGLang priority baseline: client priority from the prompt length


def plan(a) -> list[Run]:
    """The runs, most important first (what a short budget keeps)."""
    P = lambda n: str(POLICY_DIR / n)  # noqa: E731
    lenpred = a.policy or [P("predicted.yaml"), P("predicted-slo.yaml")]
    name = lambda f: pathlib.Path(f).stem  # noqa: E731
    main = lenpred[0]
    runs = [Run("batch", "vanilla", P("batch-rl-fcfs.yaml"), "none"),
            Run("online", "round-robin", P("baseline-round-robin.yaml"), "none"),
            Run("online", "least-load", P("baseline-least-load.yaml"), "none"),
            Run("online", "sglang-priority", P("baseline-round-robin.yaml"), "none", priority=True),
            Run("online", name(main), main, "injected"),
            Run("batch", "lpt", P("batch-rl-lpt.yaml"), "injected"),
            Run("batch", "lpt-oracle", P("batch-rl-lpt.yaml"), "oracle")]
    if a.over:
        runs += [Run("online", f"round-robin@{a.over:g}x", P("baseline-round-robin.yaml"), "none", a.over),
                 Run("online", f"{name(main)}@{a.over:g}x", main, "injected", a.over)]
    runs += [*[Run("online", name(f), f, "injected") for f in lenpred[1:]],
             Run("online", f"{name(main)}-oracle", main, "oracle")]
    if a.only:
        keep = a.only.split(",")
        runs = [r for r in runs if r.label in keep]
    return runs


class Bench:
    def __init__(self, a, argv: list[str]):
        self.a = a
        self.t0 = time.monotonic()
        self.out = pathlib.Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_dir = pathlib.Path(a.log_dir or tempfile.mkdtemp(prefix="lenpred-schedreal-"))
        self.work = wl.Workload.load(a.trace, tokenizer=a.tokenizer, pool=a.pool, seed=a.seed,
                                     length_scale=a.length_scale, prompt_tokens=a.prompt_tokens, cap_base=a.clip_estimate)
        self.batch_items = wl.distinct_prompts(self.work.items[: a.batch_n])
        top = (a.clip_estimate + len(self.work.items) + WARMUP_ITEMS   # 512: the longest warm-up prompt
               + max(self.work.description["prompt_max"], max(i.prompt_tokens for i in self.batch_items),
                     int(512 / a.length_scale)))
        if top >= min(CONTEXT, a.max_total_tokens) - 1:
            raise SystemExit(f"caps up to {top} tokens (clip {a.clip_estimate} + pool + prompt) would be clamped by "
                             f"SGLang (context {CONTEXT}, KV pool {a.max_total_tokens}): lower --pool or raise the KV")
        self.models = {"none": ErrorModel.load(a.error, a.seed), "injected": ErrorModel.load(a.error, a.seed),
                       "oracle": ErrorModel(seed=a.seed)}
        self.spec = eng.EngineSpec(model=a.model, device=a.device, dummy=a.dummy, max_total_tokens=a.max_total_tokens,
                                   mem_fraction=a.mem_fraction, max_running=a.max_running,
                                   cuda_graph_bs=a.cuda_graph_bs, tap_every=a.tap_every, clip_estimate=a.clip_estimate)
        self.rate = a.rate
        self.length_mode = "eos"
        self.res: dict = {
            "bench": "schedule-real", "injected_predictions": True, "command": "lenpred bench schedule-real " + " ".join(argv),
            "environment": {**report.environment(), "sglang": _version("sglang")}, "replicas": a.replicas,
            "engine": self.spec.describe(), "workload": self.work.description,
            "batch_workload": {"requests": len(self.batch_items),
                               "prompt_mean_before": statistics.fmean(i.prompt_tokens for i in self.work.items[: a.batch_n]),
                               "prompt_mean": statistics.fmean(i.prompt_tokens for i in self.batch_items),
                               "output_mean": statistics.fmean(i.output_tokens for i in self.batch_items),
                               "note": "the first --batch-n items, prompt lengths made distinct (the router's 1-token "
                                       "probes are matched by prompt length)"},
            "error_model": self.models["injected"].describe(), "length_control": {}, "saturation": {}, "slo": {},
            "drain_s": a.drain_s, "rows": [], "skipped": [], "errors": []}
        self.raw: dict = {"row_fields": replay.ROW, "items": [[i.index, i.prompt_tokens, i.output_tokens, i.cap]
                                                                for i in self.work.items],
                          "batch_items": [[i.index, i.prompt_tokens, i.output_tokens, i.cap] for i in self.batch_items],
                          "predicted_p50": [i.output_tokens * math.exp(self.models["injected"].draw(i.id))
                                            for i in self.work.items],
                          "runs": {}}

    # -- bookkeeping ---------------------------------------------------------------------------
    def left(self) -> float:
        return self.a.budget_s - (time.monotonic() - self.t0) if self.a.budget_s else float("inf")

    def save(self) -> None:
        self.res["wall_s"] = time.monotonic() - self.t0
        base = self.out / self.a.name
        base.with_suffix(".json").write_text(json.dumps(self.res, indent=1, default=str))
        base.with_suffix(".md").write_text(summary.render(self.res))
        pathlib.Path(f"{base}_raw.json").write_text(json.dumps(self.raw, default=str))

    def estimate(self, run: Run) -> float:
        if run.mode == "online":
            return self.a.online_s + min(self.a.drain_s, 15) + 10
        return (self.a.batch_n / self.rate if self.rate else 60) + 20

    # -- phases --------------------------------------------------------------------------------
    def check_lengths(self, urls: list[str], modes=("eos", "max-new-tokens")) -> None:
        """Warm every replica up (prefill shapes, decode) and verify the length control on it."""
        shapes = [(4, 1), (16, 3), (64, 17), (256, 40), (512, 64), (32, 7), (128, 33), (8, 2)]
        s, n = self.a.length_scale, len(self.work.items)
        items = [Item(f"warm{k}", n + k, max(int(p / s), 2), max(int(o / s), 1), self.a.clip_estimate + n + k)
                 for k, (p, o) in enumerate(shapes[:WARMUP_ITEMS])]
        self.inj.set(items=items)

        async def go(mode: str) -> list[tuple[int, int]]:
            import httpx

            async with httpx.AsyncClient(timeout=300) as c:
                async def one(url, it):
                    r = await c.post(url + "/generate", json=wl.body(it, "warmup", self.a.eos, length_control=mode))
                    return it.output_tokens, (r.json().get("meta_info") or {}).get("completion_tokens", -1)
                return await asyncio.gather(*(one(u, it) for u in urls for it in items))

        checked = {}
        for mode in modes:
            try:
                pairs = asyncio.run(go(mode))
            except Exception as e:  # noqa: BLE001 — e.g. a replica died on the processor
                checked[mode] = {"error": f"{type(e).__name__}: {e}"[:500]}
                continue
            bad = [p for p in pairs if p[0] != p[1]]
            checked[mode] = {"requests": len(pairs), "wrong": len(bad), "examples": bad[:5]}
            if not bad:
                self.length_mode = mode
                break
        else:
            self.length_mode = "eos"
            self.res["errors"].append(f"length control failed in both modes: {checked}")
        note = ("custom logit processor ends each answer at its trace length on EOS; max_new_tokens is a generic "
                f"cap ({self.a.clip_estimate} + item index; SGLang estimates every request at {self.a.clip_estimate}), "
                "so neither the router nor SGLang's admission knows the length"
                if self.length_mode == "eos" else
                "FALLBACK ignore_eos + max_new_tokens = length: the router caps estimates at the true length and "
                "SGLang reserves KV for it; predicted rows are optimistic")
        self.res["length_control"] = {"mode": self.length_mode, "note": note, "check": checked}

    def engine_counter(self, urls: list[str], name: str) -> float:
        total = 0.0
        for u in urls:
            try:
                with urllib.request.urlopen(u + "/metrics", timeout=5) as r:
                    total += _metric(r.read().decode(), name)
            except OSError:
                pass
        return total

    def do(self, run: Run, engines: list, redis_url: str) -> None:
        a = self.a
        urls = [e.url for e in engines]
        if run.mode == "online" and not self.rate:
            self.res["errors"].append(f"{run.label}: no saturation rate (the vanilla batch run failed; pass --rate)")
            return
        if self.estimate(run) > self.left():
            self.res["skipped"].append(run.label)
            return
        print(f"[schedule-real] {run.mode} {run.label} ({pathlib.Path(run.policy).name}, predictions "
              f"{run.predictions}) ...", file=sys.stderr, flush=True)
        self.inj.set(model=self.models[run.predictions], items=self.work.items if run.mode == "online" else self.batch_items)

        def make(it: Item) -> dict:
            return wl.body(it, run.label, a.eos, wl.prompt_priority(it) if run.priority else None, self.length_mode)

        retracted0 = self.engine_counter(urls, "sglang:num_retracted_requests_total")
        router, url = run_router(run.policy, urls, redis_url, NAMESPACE, self.log_dir, f"router-{run.label}")
        row = {"label": run.label, "mode": run.mode, "policy": os.path.relpath(run.policy),
               "predictions": run.predictions, "client_priority": run.priority}
        try:
            if run.mode == "online":
                rate = self.rate * run.rate_factor
                arrivals = self.work.poisson(rate, a.online_s, a.seed)
                results, loads, wall = asyncio.run(replay.online(url, urls, arrivals, make, warmup_s=a.warmup_s,
                                                                 drain_s=a.drain_s))
                row.update(rate_rps=rate, window_s=a.online_s - a.warmup_s, warmup_s=a.warmup_s)
            else:
                items = self.batch_items
                left = self.left()
                results, bsum, loads, wall = asyncio.run(replay.batch(
                    url, urls, items, make, timeout_s=max(left, 60) if left != float("inf") else None))
                row.update(summary.batch(results), batch_summary={k: bsum.get(k) for k in (
                    "probes", "probe_predictions", "probe_s", "replica_finish_s", "error") if k in bsum})
            with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
                metrics = r.read().decode()
            row["router_preemptions"] = _metric(metrics, "lenpred_router_preemptions_total")
        finally:
            router.stop()
            row["quiesced"] = eng.quiesce(engines)
        row["retractions"] = self.engine_counter(urls, "sglang:num_retracted_requests_total") - retracted0
        row["wall_s"] = wall
        self.res["rows"].append(row)
        self.raw["runs"][run.label] = {"mode": run.mode, "results": [r.row() for r in results], "loads": loads}
        if run.label == "vanilla" and not self.rate:
            # the batch items' prompts were lengthened: on KV-bound replicas the online items (original
            # prompts) complete faster by the ratio of KV held over a request's life, L x (P + L/2)
            kv = lambda items: sum(i.output_tokens * (i.prompt_tokens + i.output_tokens / 2) for i in items)  # noqa: E731
            ratio = kv(self.batch_items) / kv(self.work.items[: a.batch_n])
            steady = row.get("steady_rps") or row.get("throughput_rps")
            self.rate = steady * ratio
            self.res["saturation"] = {"rate_rps": self.rate, "vanilla_steady_rps": steady, "kv_ratio": ratio,
                                      "source": f"steady completion rate (10th-90th percentile of completions) of the "
                                                f"vanilla batch run, x{ratio:.2f} for its lengthened prompts (KV held "
                                                f"over a request's life, L x (P + L/2), batch items over the originals)"}
        self.summarize_online()
        self.save()

    def summarize_online(self) -> None:
        """(Re)compute the online rows: the SLO depends on the round-robin run."""
        a = self.a
        rr = self.raw["runs"].get("round-robin")
        if a.slo_tpot_ms:
            self.res["slo"] = {"ttft_s": a.slo_ttft_s, "tpot_ms": a.slo_tpot_ms, "source": "given"}
        elif rr:
            base = summary.online([_result(x) for x in rr["results"]], 1.0, None)["tpot_p50_ms"]
            if base:
                self.res["slo"] = {"ttft_s": a.slo_ttft_s, "tpot_ms": 1.5 * base, "source":
                                   f"1.5 x the round-robin run's median TPOT ({base:.1f} ms), set before the other rows"}
        slo = self.res["slo"] or None
        base = summary.online([_result(x) for x in rr["results"]], 1.0, None)["tpot_p50_ms"] if rr else None
        for row in self.res["rows"]:
            if row["mode"] != "online":
                continue
            results = [_result(x) for x in self.raw["runs"][row["label"]]["results"]]
            row.update(summary.online(results, row["window_s"], slo))
            if base:
                row["goodput_grid"] = summary.grid([r for r in results if r.measured], row["window_s"], base)

    def main(self) -> int:
        a = self.a
        # `timeout` and the device runner stop with SIGTERM: unwind, so replicas are stopped and
        # what was measured is written
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with contextlib.ExitStack() as stack:
            redis = RedisServer.start()
            stack.callback(redis.stop)
            self.inj = InjectingSidecar(redis.url, NAMESPACE, self.models["injected"])
            stack.callback(self.inj.stop)
            smol_thread = None
            if a.smol_model and a.device == "cpu":   # one set of engines at a time on a CPU box
                self.res["smollm2_e2e"] = self.smol(redis.url)
                self.save()
            engines = eng.launch(self.spec, a.replicas, self.inj.target, self.log_dir)
            stack.callback(eng.stop, engines)
            if a.smol_model and a.device != "cpu":   # overlaps the replicas' start-up
                smol_thread = threading.Thread(target=lambda: self.res.__setitem__("smollm2_e2e", self.smol(redis.url)))
                smol_thread.start()
            try:
                self.res["startup_s"] = eng.wait(engines, a.startup_timeout)
            except eng.EngineError as e:
                self.res["errors"].append(f"engines did not start: {str(e)[-3000:]}")
                if smol_thread:
                    smol_thread.join()
                self.finish(engines)
                return 1
            if smol_thread:
                smol_thread.join()
            self.check_lengths([e.url for e in engines])
            if not all(e.alive() for e in engines):   # never seen; a replica lost must not sink the run
                self.res["errors"].append("a replica died during the length check:\n" + eng.tails(engines, 30))
                eng.stop(engines)
                engines[:] = eng.launch(self.spec, a.replicas, self.inj.target, self.log_dir, "engine-retry")
                eng.wait(engines, a.startup_timeout)
                self.check_lengths([e.url for e in engines], ("max-new-tokens",))
            self.save()
            for run in plan(a):
                try:
                    self.do(run, engines, redis.url)
                except Exception as e:  # noqa: BLE001 — record it, keep the other runs
                    self.res["errors"].append(f"{run.label}: {type(e).__name__}: {e}"[:1000])
                    eng.quiesce(engines)
                    self.save()
            self.res["injector"] = self.inj.stats()
            self.finish(engines)
        return 0 if self.res["rows"] else 1

    def smol(self, redis_url: str) -> dict:
        a = self.a
        P = lambda n: str(POLICY_DIR / n)  # noqa: E731
        return e2e.run(model=a.smol_model, device=a.device, replicas=a.smol_replicas, prompts_file=a.smol_prompts,
                       n=a.smol_n, rate=a.smol_rate, max_tokens=a.smol_max_tokens,
                       policies=[P("baseline-round-robin.yaml"), P("predicted.yaml")], redis_url=redis_url,
                       log_dir=self.log_dir, max_total_tokens=a.smol_kv, mem_fraction=a.mem_fraction, seed=a.seed)

    def finish(self, engines) -> None:
        self.save()
        logs = [eng.tails(engines, 60)]
        for f in sorted(self.log_dir.glob("*.log")):
            if not f.name.startswith("engine-"):
                logs.append(f"==== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
        (self.out / f"{self.a.name}_logs.txt").write_text("\n".join(logs))
        print(summary.render(self.res))


def _result(row: list) -> replay.Result:
    return replay.Result(**dict(zip(replay.ROW, row)))


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="lenpred bench schedule-real", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--model", default=None, help="model folder (default on CPU: the shipped SmolLM2)")
    p.add_argument("--dummy", action=argparse.BooleanOptionalAction, default=None,
                   help="--load-format dummy --skip-tokenizer-init (default: on for cuda)")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--max-total-tokens", type=int, default=16384, help="KV budget per replica (tokens)")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="--mem-fraction-static (default 0.75 on cuda: replicas load concurrently; 0.3 on cpu)")
    p.add_argument("--max-running", type=int, default=128)
    p.add_argument("--cuda-graph-bs", type=int, default=128)
    p.add_argument("--tap-every", type=int, default=16)
    p.add_argument("--eos", type=int, default=2, help="EOS token id the engines stop on")
    p.add_argument("--clip-estimate", type=int, default=2048,
                   help="SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION, and the base of the per-item caps")
    p.add_argument("--trace", default="sharegpt:../shared/data/sharegpt/first_turn.jsonl")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --trace sharegpt:FILE")
    p.add_argument("--pool", type=int, default=2900)
    p.add_argument("--length-scale", type=float, default=1.0, help="divide prompt and output lengths (CPU smoke)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for seqsched traces")
    p.add_argument("--error", default="residuals", help="residuals | residuals:FILE (injected error model)")
    p.add_argument("--policy", action="append", default=[], help="lenpred policy for the online runs (repeatable)")
    p.add_argument("--rate", type=float, default=None, help="saturation rate, req/s (default: from the vanilla batch run)")
    p.add_argument("--over", type=float, default=1.3, help="above-saturation factor (0: no such runs)")
    p.add_argument("--online-s", type=float, default=20.0, help="arrival window of an online run")
    p.add_argument("--warmup-s", type=float, default=4.0, help="arrivals before this are not measured")
    p.add_argument("--drain-s", type=float, default=20.0, help="wait this long after the last arrival")
    p.add_argument("--batch-n", type=int, default=160)
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--only", default="", help="comma-separated run labels to run")
    p.add_argument("--budget-s", type=float, default=0, help="wall-clock budget for everything (0: none)")
    p.add_argument("--startup-timeout", type=float, default=400)
    p.add_argument("--smol-model", default=None, help="SmolLM2 folder: also run the real end-to-end spine")
    p.add_argument("--smol-prompts", default="../shared/data/sharegpt/first_turn.jsonl")
    p.add_argument("--smol-replicas", type=int, default=2)
    p.add_argument("--smol-n", type=int, default=120)
    p.add_argument("--smol-rate", type=float, default=8.0)
    p.add_argument("--smol-max-tokens", type=int, default=256)
    p.add_argument("--smol-kv", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--name", default=None, help="output file stem (default schedule_gpu / schedule_cpu)")
    p.add_argument("--log-dir", default=None)
    a = p.parse_args(argv)
    if a.model is None:
        if a.device == "cuda":
            p.error("--model is required on cuda (e.g. the 8B-shaped config folder)")
        from lenpred.model import hf_checkpoint

        a.model = str(hf_checkpoint())
    a.dummy = (a.device == "cuda") if a.dummy is None else a.dummy
    a.mem_fraction = a.mem_fraction or (0.75 if a.device == "cuda" else 0.3)
    a.name = a.name or ("schedule_gpu" if a.device == "cuda" else "schedule_cpu")
    return a


def prepare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lenpred bench schedule-real prepare",
                                description="tokenize ShareGPT once into the small files a GPU run carries")
    p.add_argument("--sharegpt", default="../shared/data/sharegpt/first_turn.jsonl")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True, help="lengths file (for --trace lengths:FILE)")
    p.add_argument("--prompts-out", default=None, help="also write N real prompts (for --smol-prompts)")
    p.add_argument("--prompts", type=int, default=300)
    a = p.parse_args(argv)
    n = wl.prepare(a.sharegpt, a.tokenizer, a.out)
    print(f"{a.out}: {n} items")
    if a.prompts_out:
        rows = [json.loads(x) for x in pathlib.Path(a.sharegpt).read_text().split("\n") if x.strip()]
        rows = [r for r in rows if len(r["prompt"]) <= 1500][: a.prompts]
        pathlib.Path(a.prompts_out).write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n"
                                                       for r in rows))
        print(f"{a.prompts_out}: {len(rows)} prompts")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    return Bench(parse(argv), argv).main()


if __name__ == "__main__":
    raise SystemExit(main())

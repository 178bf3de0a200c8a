"""`lenpred collect-sglang`: length traces from real SGLang serving with the lenpred tap.

The GPU collection path: one SGLang 0.5.23 server (CUDA graphs on a GPU; the CPU engine with
`--device cpu` for tests) with the tap plugin loaded by its entry point, pool ON (the entropy pool
and the last prompt token's state are shipped at prefill) and a decode state every
`--every` tokens, streaming into an in-process `TraceServer` (real gRPC) that keeps only what
training needs. Prompts go to `/generate` as token ids (chat template applied here), K samples each,
`--concurrency` requests in flight. The features are therefore exactly what a serving tap ships.

What the engine tap cannot give (the mean-pool baseline, the pooling/layer ablation) comes from a
prompt-only transformers pass before SGLang starts (`--prompt-pass mean|ablation`, cheap: no
generation; see lenpred/train/prompt_pass.py).

Output: shards in the `lenpred collect` format (lenpred.train.data.load reads them; `lenpred train`
and `lenpred bench learn` use them), each at most `--shard-mib`, written as prompts complete (all K
samples finished and reported by the tap), plus manifest.json. Extra arrays: `finish_seq` (request
level: the order in which the tap reported finished events, i.e. arrival order for replay) and
`abl_<variant>` (prompt level) with `--prompt-pass ablation`. The radix cache is off so every
sample's prefill is computed in full and its entropy pool is exact (the prompt-level features come
from the first sample whose prefill arrived).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np

from lenpred.train.prompts import FORMATS, PromptFileError, load_prompts, prompts_hash

GPU_FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lenpred collect-sglang", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder, .gguf file or known model name (default: SmolLM2)")
    ap.add_argument("--model-id", default=None, help="id the tap reports (default: the checkpoint's canonical id)")
    ap.add_argument("--prompts", required=True, help="jsonl prompt file(s), comma-separated")
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped")
    ap.add_argument("--every", type=int, default=8, help="tap decode stride k (LENPRED_TAP_EVERY)")
    ap.add_argument("--keep-steps", default="8,16,32,64,128,256",
                    help="decode steps stored: the first state at or after each (the tap samples every k engine steps)")
    ap.add_argument("--stride", type=int, default=128, help="also store every multiple of this (0 = none)")
    ap.add_argument("--decode-samples", type=int, default=2, help="store decode states for the first J samples")
    ap.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop submitting prompts after this")
    ap.add_argument("--prompt-pass", default="mean", choices=("none", "mean", "ablation"))
    ap.add_argument("--prompt-batch", type=int, default=32)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--mem-fraction", type=float, default=None, help="SGLang --mem-fraction-static")
    ap.add_argument("--shard-mib", type=float, default=14.0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("sglang_args", nargs="*", help="extra sglang.launch_server arguments (after --)")
    return ap


# ------------------------------------------------------------------------------------- engine
def launch(a, ckpt: pathlib.Path, model_id: str, sidecar: str, log_path: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ)
    tap_env = {"SGLANG_PLUGINS": "lenpred_tap", "LENPRED_SIDECAR": sidecar, "LENPRED_MODEL_ID": model_id,
               "LENPRED_TAP_POOL": "1", "LENPRED_TAP_EVERY": str(a.every), "LENPRED_TAP_DTYPE": "float16",
               "LENPRED_TAP_PREFIX_TOKENS": "0", "LENPRED_TAP_QUEUE": "65536", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    common = ["--model-path", str(ckpt), "--host", "127.0.0.1", "--port", str(a.port),
              "--return-hidden-states-mode", "full", "--disable-radix-cache",
              "--max-running-requests", str(a.concurrency)]
    if a.device == "cpu":
        from lenpred.harness.engine import CPU_FLAGS, engine_env

        env = engine_env(sidecar, tap_env)
        cmd = [sys.executable, "-m", "sglang.launch_server", *common, *CPU_FLAGS,
               "--mem-fraction-static", str(a.mem_fraction or 0.3), "--max-total-tokens", "20000"]
    else:
        env.update(tap_env)
        # the Rust radix core misreads tensors under torch 2.11 (see gpu-kit); harmless elsewhere
        env.setdefault("SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", "python")
        cmd = [sys.executable, "-m", "sglang.launch_server", *common, *GPU_FLAGS,
               "--mem-fraction-static", str(a.mem_fraction or 0.6),
               "--cuda-graph-max-bs", str(min(a.concurrency, 512))]
    cmd += list(a.sglang_args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("launch:", " ".join(cmd), flush=True)
    with open(log_path, "wb") as lf:
        return subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)


def wait_health(url: str, proc: subprocess.Popen, log_path: pathlib.Path, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"SGLang exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"SGLang not healthy within {timeout}s:\n{_tail(log_path)}")


def _tail(p: pathlib.Path, n: int = 60) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def generate(url: str, rid: str, ids: list[int], sp: dict) -> tuple[str, int, str]:
    body = json.dumps({"rid": rid, "input_ids": ids, "sampling_params": sp}).encode()
    req = urllib.request.Request(url + "/generate", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        out = json.load(r)
    mi = out["meta_info"]
    return rid, int(mi["completion_tokens"]), str((mi.get("finish_reason") or {}).get("type", ""))


# ------------------------------------------------------------------------------------- shards
class ShardWriter:
    """Buffers completed prompts and writes a shard whenever the buffer reaches the size budget."""

    def __init__(self, out: pathlib.Path, budget_bytes: int, manifest: dict):
        self.out, self.budget, self.manifest = out, budget_bytes, manifest
        self.buf: list[dict] = []
        self.bytes = 0
        self.n_shards = 0
        self.written_prompts = 0

    def add(self, rec: dict) -> None:
        self.buf.append(rec)
        self.bytes += sum(v.nbytes for v in rec.values() if isinstance(v, np.ndarray))
        if self.bytes >= self.budget:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        P = len(self.buf)
        cat = lambda k: np.stack([r[k] for r in self.buf])  # noqa: E731
        K = [len(r["length"]) for r in self.buf]
        req_off = np.cumsum([0] + K)
        z = {
            "prompt_id": np.array([r["prompt_id"] for r in self.buf]), "dataset": np.array([r["dataset"] for r in self.buf]),
            "text": np.array([r["text"] for r in self.buf]),
            "prompt_tokens": np.array([r["prompt_tokens"] for r in self.buf], np.int32),
            "pooled": cat("pooled"), "last": cat("last"),
            "ent_mean": np.array([r["ent_mean"] for r in self.buf], np.float32),
            "req_prompt": np.repeat(np.arange(P, dtype=np.int32), K),
            "req_sample": np.concatenate([np.arange(k, dtype=np.int32) for k in K]),
            "length": np.concatenate([r["length"] for r in self.buf]).astype(np.int32),
            "capped": np.concatenate([r["capped"] for r in self.buf]).astype(bool),
            "finish_seq": np.concatenate([r["finish_seq"] for r in self.buf]).astype(np.int64),
            "dec_req": np.concatenate([r["dec_req"] + req_off[i] for i, r in enumerate(self.buf)]).astype(np.int32),
            "dec_step": np.concatenate([r["dec_step"] for r in self.buf]).astype(np.int32),
            "dec_vec": np.concatenate([r["dec_vec"] for r in self.buf]).astype(np.float16),
        }
        for k in ("ent_std", "ent_max", "ent_last"):  # not shipped by the engine tap
            z[k] = np.zeros(P, np.float32)
        for k in self.buf[0]:
            if k == "mean" or k.startswith("abl_"):
                z[k] = cat(k)
        path = self.out / f"shard-{self.n_shards:05d}.npz"
        tmp = self.out / f".shard-{self.n_shards:05d}.tmp.npz"
        np.savez(tmp, **z, meta=np.array(json.dumps({**self.manifest, "shard": self.n_shards})))
        os.replace(tmp, path)
        self.n_shards += 1
        self.written_prompts += P
        self.buf, self.bytes = [], 0


def assemble(q, ids: list[int], traces: list, feats: dict[str, np.ndarray] | None, row: int, d: int) -> dict | None:
    """One prompt's arrays from its K request traces; None if a sample is unusable."""
    if any(t is None or not t.done or t.aborted or t.output_tokens < 0 for t in traces):
        return None
    src = next((t for t in traces if t.last is not None and t.pooled is not None), None)
    if src is None:
        return None
    dreq, dstep, dvec = [], [], []
    for k, t in enumerate(traces):
        for s in sorted(t.decode):
            if s < t.output_tokens:  # a state at step s exists only while the reply runs
                dreq.append(k), dstep.append(s), dvec.append(t.decode[s])
    rec = {"prompt_id": q.id, "dataset": q.dataset, "text": q.text, "prompt_tokens": len(ids),
           "pooled": src.pooled, "last": src.last, "ent_mean": src.entropy_mean,
           "length": np.array([t.output_tokens for t in traces]), "capped": np.array([t.truncated for t in traces]),
           "finish_seq": np.array([t.finish_seq for t in traces]),
           "dec_req": np.array(dreq, np.int32), "dec_step": np.array(dstep, np.int32),
           "dec_vec": np.stack(dvec) if dvec else np.zeros((0, d), np.float16)}
    if feats:
        for k, v in feats.items():
            rec["mean" if k == "mean" else f"abl_{k}"] = v[row]
    return rec


# ------------------------------------------------------------------------------------- main
def sample_index(rid: str) -> int:
    """The sample number of a collection rid `<prompt key>-<sample>`; rids that are not the
    collector's (SGLang's own warm-up request, health checks) get a number no sample has."""
    head, _, tail = rid.rpartition("-")
    return int(tail) if head and tail.isdigit() else 1 << 30


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = build_parser().parse_args(argv)
    a.sglang_args = extra
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the SGLang server
    t_start = time.time()
    try:
        prompts = []
        for f in [x for x in a.prompts.split(",") if x]:
            prompts += load_prompts(f, a.format, limit=a.limit)
        prompts = prompts[:a.limit] if a.limit else prompts
    except PromptFileError as e:
        print(f"lenpred collect-sglang: {e}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoTokenizer

    from lenpred.model import model_id_of, resolve
    from lenpred.train.collect import encode
    from lenpred.train.trace_server import TraceServer

    torch.set_num_threads(a.threads)
    ckpt = resolve(a.model)
    model_id = a.model_id or model_id_of(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    enc = [encode(tok, q) for q in prompts]
    keep = [i for i, e in enumerate(enc) if len(e) <= a.max_prompt_tokens]
    skipped = len(prompts) - len(keep)
    prompts, enc = [prompts[i] for i in keep], [enc[i] for i in keep]
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.npz")):
        print(f"lenpred collect-sglang: {out} already holds shards; use a new --out", file=sys.stderr)
        return 2
    # ---- prompt-only pass (before SGLang takes the GPU memory)
    feats, t_pass = None, 0.0
    if a.prompt_pass != "none":
        from transformers import AutoModelForCausalLM

        from lenpred.train.prompt_pass import prompt_features, template_prefix_len

        t0 = time.time()
        dev = "cuda" if a.device == "cuda" else "cpu"
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(dev).eval()
        feats = prompt_features(hf, enc, variants=a.prompt_pass, p0=template_prefix_len(tok, encode),
                                batch_size=a.prompt_batch, device=dev)
        del hf
        if dev == "cuda":
            torch.cuda.empty_cache()
        t_pass = time.time() - t0
        print(f"prompt pass ({a.prompt_pass}): {len(enc)} prompts in {t_pass:.1f}s", flush=True)
    keep_steps = {int(x) for x in a.keep_steps.split(",") if x.strip()}
    if a.stride:
        keep_steps |= set(range(a.stride, a.max_new_tokens, a.stride))
    ts = TraceServer(keep_steps, want_decode=lambda rid: sample_index(rid) < a.decode_samples)
    manifest = {
        "model_id": model_id, "hidden_size": 0, "layer": -1, "tau": 1.0, "engine": "sglang",
        "prompts": a.prompts, "format": a.format, "prompts_hash": prompts_hash(prompts), "n_prompts": len(prompts),
        "skipped_long_prompts": skipped, "samples": a.samples, "temperature": a.temperature, "top_p": a.top_p,
        "max_new_tokens": a.max_new_tokens, "max_prompt_tokens": a.max_prompt_tokens, "every": a.every,
        "record_steps": sorted(keep_steps), "decode_samples": a.decode_samples, "prompt_pass": a.prompt_pass,
        "device": a.device, "seed": None, "dtype": "float16",
        "command": "lenpred collect-sglang " + " ".join(sys.argv[1:] if argv is None else argv + (["--"] + extra if extra else [])),
        "length_convention": "generated tokens incl. EOS (tap Finished.output_tokens); capped = stopped by max_new_tokens",
    }
    url = f"http://127.0.0.1:{a.port}"
    log_path = out / "sglang.log"
    proc = launch(a, ckpt, model_id, ts.target, log_path)
    stats = {"http_len_mismatch": 0, "incomplete_prompts": 0, "generated_tokens": 0, "http_errors": 0}
    try:
        startup = wait_health(url, proc, log_path, a.startup_timeout)
        print(f"SGLang healthy after {startup:.0f}s", flush=True)
        manifest["hidden_size"] = 0
        sp = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p}
        writer = None
        t_gen = time.time()
        pending: dict[int, int] = {}       # prompt row -> samples still running
        http_len: dict[str, int] = {}
        ready: list[int] = []
        next_p = 0
        futs_rid: dict = {}
        with cf.ThreadPoolExecutor(a.concurrency) as ex:
            futs = set()

            def submit_more():
                nonlocal next_p
                while (len(futs) + a.samples <= a.concurrency and next_p < len(prompts)
                       and (a.max_seconds is None or time.time() - t_gen < a.max_seconds)):
                    pending[next_p] = a.samples
                    for k in range(a.samples):
                        f = ex.submit(generate, url, f"c{next_p}-{k}", enc[next_p], sp)
                        futs.add(f)
                        futs_rid[f] = f"c{next_p}-{k}"
                    next_p += 1

            def drain_ready(final=False):
                nonlocal writer
                still = []
                for i in ready:
                    rids = [f"c{i}-{k}" for k in range(a.samples)]
                    if len(ts.done(rids)) < a.samples and not final:
                        still.append(i)
                        continue
                    traces = [ts.pop(r) for r in rids]
                    failed = any(http_len.get(r, -1) < 0 for r in rids)
                    for r, t in zip(rids, traces):
                        if t is not None and t.done and http_len.get(r, -1) >= 0 and t.output_tokens != http_len[r]:
                            stats["http_len_mismatch"] += 1
                    if writer is None and ts.hidden_size:
                        manifest["hidden_size"] = ts.hidden_size
                        writer = ShardWriter(out, int(a.shard_mib * (1 << 20)), manifest)
                    rec = assemble(prompts[i], enc[i], traces, feats, i, ts.hidden_size) if writer and not failed else None
                    if rec is None:
                        stats["incomplete_prompts"] += 1
                    else:
                        writer.add(rec)
                ready[:] = still

            submit_more()
            last_log = time.time()
            while futs:
                done, _ = cf.wait(futs, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    futs.discard(f)
                    try:
                        rid, n, _reason = f.result()
                    except (OSError, ValueError, KeyError) as e:  # one failed request drops its prompt
                        rid, n = futs_rid.pop(f), -1
                        stats["http_errors"] += 1
                        if stats["http_errors"] <= 3:
                            print(f"  request {rid} failed: {e}", flush=True)
                        if proc.poll() is not None:
                            raise RuntimeError(f"SGLang exited with {proc.returncode}:\n{_tail(log_path)}") from e
                    futs_rid.pop(f, None)
                    http_len[rid] = n
                    stats["generated_tokens"] += max(n, 0)
                    p = int(rid[1:].split("-")[0])
                    pending[p] -= 1
                    if pending[p] == 0:
                        ready.append(p)
                submit_more()
                drain_ready()
                if time.time() - last_log > 15:
                    el = time.time() - t_gen
                    print(f"  {el:.0f}s: {next_p}/{len(prompts)} prompts submitted, "
                          f"{stats['generated_tokens'] / el:.0f} tok/s", flush=True)
                    last_log = time.time()
        gen_s = time.time() - t_gen
        deadline = time.time() + 60
        while ready and time.time() < deadline:  # the tap reports finished events after the HTTP reply
            drain_ready()
            time.sleep(0.2)
        drain_ready(final=True)
        if writer:
            writer.flush()
        manifest.update({
            "submitted_prompts": next_p, "written_prompts": writer.written_prompts if writer else 0,
            "shards": writer.n_shards if writer else 0, "startup_s": round(startup, 1),
            "generate_s": round(gen_s, 1), "prompt_pass_s": round(t_pass, 1),
            "tokens_per_s": round(stats["generated_tokens"] / max(gen_s, 1e-9), 1), "tap_messages": ts.messages,
            "wall_s": round(time.time() - t_start, 1), **stats})
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        print(json.dumps({k: manifest[k] for k in ("model_id", "hidden_size", "written_prompts", "shards",
                                                    "startup_s", "generate_s", "tokens_per_s", "http_len_mismatch",
                                                    "incomplete_prompts", "wall_s")}), flush=True)
    finally:
        stop(proc)
        ts.stop()
    return 0 if manifest.get("written_prompts") else 1


if __name__ == "__main__":
    sys.exit(main())

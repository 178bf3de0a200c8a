"""`lenpred bench entropy`: what EGTP's prompt-token entropy costs against the prefill itself, and
cheaper approximations with their accuracy.

For prompts of N tokens (real ShareGPT prompts, truncated/tiled to N) on the shipped model:
  prefill            model.model forward (all layers, final norm) — the work the engine does anyway
  exact              full-vocabulary logits (lm_head) + log_softmax entropy at every position, chunked
  truncated-V        logits/entropy over the first K vocabulary ids only (BPE ids ~ merge order ~ frequency)
  low-rank r         logits through a rank-r SVD of the LM head (h·V_r)·(S_r U_rᵀ), full vocabulary
  top-k renorm       exact logits, entropy of the renormalised top-k (no saving: shows the error alone)
  last-M only        exact entropy for the last M positions, the rest weighted uniformly (entropy = mean)
Accuracy: Pearson r of approximate vs exact entropies, and cosine / relative L2 error of the
resulting EGTP pool against the exact pool (tau = 1).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench entropy")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", default=None, help="jsonl prompts (default ../shared/data/sharegpt/first_turn.jsonl)")
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from lenpred.tap.pooling import pool_direct, token_entropy
    from lenpred.train.collect import encode, load_model
    from lenpred.train.prompts import load_prompts

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    tok, model, mid = load_model(None, dev, a.dtype)
    lm = model.get_output_embeddings()
    W = lm.weight  # [V, d]
    Wf = W.float()
    U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
    root = pathlib.Path(__file__).resolve().parents[1]
    pfile = a.prompts or str(root.parent / "shared" / "data" / "sharegpt" / "first_turn.jsonl")
    prompts = load_prompts(pfile, limit=200)
    prompts = sorted(prompts, key=lambda p: -len(p.text))[:a.n_prompts]

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(a.reps):
            out = fn()
        sync()
        return (time.perf_counter() - t) / a.reps * 1e3, out

    def ent_from_logits(lg):
        lg = lg.float()
        lp = torch.log_softmax(lg, -1)
        return -(lp.exp() * lp).sum(-1)

    rows = []
    for N in a.lengths:
        ids = []
        for p in prompts:
            ids += encode(tok, p)
        ids = (ids * (N // max(len(ids), 1) + 1))[:N]
        x = torch.tensor([ids], device=dev)
        with torch.inference_mode():
            t_pre, o = timed(lambda: model.model(input_ids=x).last_hidden_state[0])
            h = o
            t_exact, H = timed(lambda: token_entropy(lm(h), chunk=1024))
            ref_pool = pool_direct(h.float(), H)
            res = {"N": N, "prefill_ms": round(t_pre, 2), "methods": {}}

            def record(name, ms, Ha):
                Ha = Ha.float()
                r = float(np.corrcoef(Ha.cpu().numpy(), H.cpu().numpy())[0, 1]) if Ha.std() > 0 else float("nan")
                pool = pool_direct(h.float(), Ha)
                cos = float(torch.nn.functional.cosine_similarity(pool, ref_pool, 0))
                rel = float((pool - ref_pool).norm() / ref_pool.norm())
                res["methods"][name] = {"ms": round(ms, 2), "frac_of_prefill": round(ms / t_pre, 3),
                                        "entropy_r": round(r, 4), "pool_cos": round(cos, 5), "pool_rel_err": round(rel, 4)}
            record("exact", t_exact, H)
            for K in (8192, 16384):
                Wk = W[:K]
                ms, Ha = timed(lambda: ent_from_logits(h @ Wk.T))
                record(f"truncated-V{K}", ms, Ha)
            for r_ in (32, 64, 128):
                A = (Vh[:r_].T).to(h.dtype)          # [d, r]
                B = (U[:, :r_] * S[:r_]).T.to(h.dtype)  # [r, V]
                ms, Ha = timed(lambda: ent_from_logits((h @ A) @ B))
                record(f"low-rank-{r_}", ms, Ha)
            for k in (64, 256):
                def topk_ent():
                    lg = lm(h).float()
                    v = lg.topk(k, -1).values
                    return ent_from_logits(v)
                ms, Ha = timed(topk_ent)
                record(f"top-{k}-renorm", ms, Ha)
            for M in (64,):
                def lastm():
                    e = torch.full((h.shape[0],), float(H.mean()), device=h.device)
                    e[-M:] = token_entropy(lm(h[-M:]))
                    return e
                ms, Ha = timed(lastm)
                record(f"last-{M}-only", ms, Ha)
        rows.append(res)
        print(f"N={N}: prefill {t_pre:.1f} ms", flush=True)
        for k, v in res["methods"].items():
            print(f"   {k:18s} {v['ms']:8.2f} ms  {100 * v['frac_of_prefill']:6.1f}% of prefill   r={v['entropy_r']:.3f}  "
                  f"pool cos={v['pool_cos']:.5f} rel.err={v['pool_rel_err']:.4f}", flush=True)
    rep = {"model_id": mid, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (1 thread)",
           "dtype": a.dtype, "rows": rows}
    if a.json:
        pathlib.Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

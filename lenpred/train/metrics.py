"""Accuracy metrics. y = served length (min(true length, cap)); predictions are clipped to the
request's cap, since the engine stops there and a scheduler knows max_tokens."""
from __future__ import annotations

import numpy as np


def scores(y: np.ndarray, pred: np.ndarray, p90: np.ndarray | None = None, cap: np.ndarray | None = None,
           capped: np.ndarray | None = None) -> dict:
    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64)
    if cap is not None:
        pred = np.minimum(pred, cap)
    pred = np.maximum(pred, 0)
    ae = np.abs(pred - y)
    out = {
        "n": int(len(y)),
        "mae": float(ae.mean()) if len(y) else float("nan"),
        "median_ae": float(np.median(ae)) if len(y) else float("nan"),
        "acc50": float((ae <= 50).mean()) if len(y) else float("nan"),
        "acc100": float((ae <= 100).mean()) if len(y) else float("nan"),
    }
    if capped is not None and len(y):
        unc = ~np.asarray(capped, bool)
        out["mae_uncapped"] = float(ae[unc].mean()) if unc.any() else float("nan")
        out["frac_capped"] = float((~unc).mean())
    if p90 is not None and len(y):
        out["p90_coverage"] = float((y <= np.asarray(p90) + 1e-6).mean())
    return out


def calibrate_scale(y: np.ndarray, q_raw: np.ndarray, q: float) -> float:
    """Multiplicative scale s so that P(y <= s * q_raw) ~= q on held-out data."""
    ratio = np.asarray(y, np.float64) / np.maximum(np.asarray(q_raw, np.float64), 1.0)
    return float(np.quantile(ratio, q))

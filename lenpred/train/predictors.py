"""Loading trained predictors (shipped heads + baselines) behind one interface for evaluation."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np

from lenpred.sidecar.heads import LengthHead, load_head
from lenpred.train import models


@dataclass
class Predictor:
    name: str
    input: str            # pooled | mean | last | minilm | prompt_tokens | none | pooled+decode | last+decode
    target: str           # total | remaining
    params: int
    fn: object            # X -> dict(point, p50, p90)
    meta: dict = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> dict[str, np.ndarray]:
        return self.fn(X)


def _head_pred(head: LengthHead, name: str, inp: str, target: str) -> Predictor:
    return Predictor(name, inp, target, sum(p.numel() for p in head.parameters()),
                     lambda X, h=head: models.head_predict(h, X), json.loads(head.meta.to_json()))


def load_dir(path: str | pathlib.Path, hidden_size: int | None = None, model_id: str | None = None) -> dict[str, Predictor]:
    """Every predictor in a folder: lenpred heads (egtp.safetensors, plp.safetensors, *-head) and
    baseline artifacts (safetensors with `lenpred_baseline` metadata). Mismatched dims -> ValueError."""
    from safetensors import safe_open

    out: dict[str, Predictor] = {}
    p = pathlib.Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"predictor folder {p} does not exist")
    for f in sorted(p.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            md = fh.metadata() or {}
        if "lenpred" in md:
            head = load_head(f)
            m = head.meta
            if hidden_size is not None and m.hidden_size != hidden_size:
                raise ValueError(f"{f}: head is for hidden size {m.hidden_size} ({m.model_id}), "
                                 f"but the data/model has hidden size {hidden_size}")
            if model_id is not None and m.model_id != model_id:
                raise ValueError(f"{f}: head is for model {m.model_id!r}, data is from {model_id!r}")
            name = m.trained.get("name", m.kind)
            inp = m.trained.get("input", "pooled" if m.kind == "egtp" else f"{m.prompt_feature}+decode")
            out[name] = _head_pred(head, name, inp, "remaining" if m.kind == "plp" else "total")
        elif "lenpred_baseline" in md:
            meta = json.loads(md["lenpred_baseline"])
            out[meta["name"]] = _baseline(f, meta, hidden_size)
    return out


def _baseline(f: pathlib.Path, meta: dict, hidden_size: int | None) -> Predictor:
    cal = meta.get("calibration", {})
    s50, s90 = cal.get("p50_scale", 1.0), cal.get("p90_scale", 1.0)
    if meta["type"] == "const":
        from safetensors.numpy import load_file

        a = load_file(str(f))
        v, q50, q90 = float(a["value"][0]), float(a["p50"][0]), float(a["p90"][0])
        fn = lambda X: {"point": np.full(len(X), v), "p50": np.full(len(X), q50), "p90": np.full(len(X), q90)}
        return Predictor(meta["name"], "none", "total", 1, fn, meta)
    if meta["type"] == "prompt-length":
        from safetensors.numpy import load_file

        coef = load_file(str(f))["coef"]

        def fn(X, coef=coef):
            pt = models.prompt_length_predict(coef, np.asarray(X).reshape(-1))
            return {"point": pt, "p50": pt * s50, "p90": pt * s90}
        return Predictor(meta["name"], "prompt_tokens", "total", len(coef), fn, meta)
    if meta["type"] == "mlp":
        from safetensors.torch import load_file

        m = models.MLPRegressor(meta["dims"])
        m.load_state_dict(load_file(str(f)))
        m.eval()
        if hidden_size is not None and meta["input"] in ("last", "mean", "pooled") and meta["dims"][0] != hidden_size:
            raise ValueError(f"{f}: probe input dim {meta['dims'][0]} != hidden size {hidden_size}")

        def fn(X, m=m):
            pt = models.mlp_predict(m, X)
            return {"point": pt, "p50": pt * s50, "p90": pt * s90}
        return Predictor(meta["name"], meta["input"], "total", sum(p.numel() for p in m.parameters()), fn, meta)
    raise ValueError(f"{f}: unknown baseline type {meta['type']!r}")

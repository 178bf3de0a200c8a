"""Length heads (seed A's architecture) and their checkpoint format.

Head: Linear(d_in, d_in/2) -> LayerNorm -> ReLU -> Dropout(0.1) -> Linear(d_in/2, n_bins).
Output: a distribution over length bins; point estimate sum_i p_i * c_i (bin centres); quantiles
from the piecewise-linear CDF over bin edges, then scaled by a factor calibrated on held-out data
so p90 covers 90% of true lengths.

EGTP (kind="egtp") reads the pooled prompt vector (d_in = d) and predicts the total output length.
LAST (kind="last") reads the last prompt token's state (d_in = d), same target: on SmolLM2 it beats
     EGTP (docs/results/accuracy.md), so the sidecar serves whichever measured better.
PLP  (kind="plp") reads [h_prompt ; h_t] (d_in = 2d) and predicts the *remaining* length at step t;
     h_prompt is the entropy pool or the last prompt token's state (HeadMeta.prompt_feature).

Checkpoints are single safetensors files (no pickle); the metadata travels in the header under
the key "lenpred" as JSON (see HeadMeta).
"""
from __future__ import annotations

import dataclasses
import json

import pathlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


KINDS = ("egtp", "last", "plp")


@dataclass
class HeadMeta:
    kind: str                      # "egtp" | "last" | "plp"
    model_id: str                  # engine model the vectors come from
    hidden_size: int               # d of the engine model
    layer: int                     # -1 = last layer after the final norm
    input_dim: int                 # d (egtp) or 2d (plp)
    bin_edges: list[float]         # n_bins + 1 edges in tokens, increasing
    version: str = "0"
    data_hash: str = ""
    hidden_dim: int = 0            # 0 = input_dim // 2
    dropout: float = 0.1
    prompt_feature: str = "pooled"  # PLP only: h_prompt is the entropy pool ("pooled") or "last"
    calibration: dict = field(default_factory=lambda: {"p50_scale": 1.0, "p90_scale": 1.0})
    metrics: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)   # command, data, split, created
    created: float = field(default_factory=time.time)

    @property
    def n_bins(self) -> int:
        return len(self.bin_edges) - 1

    @property
    def centers(self) -> torch.Tensor:
        e = torch.tensor(self.bin_edges, dtype=torch.float32)
        return (e[:-1] + e[1:]) / 2

    def key(self) -> tuple[str, int, int, str]:
        return (self.model_id, self.hidden_size, self.layer, self.version)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> "HeadMeta":
        d = json.loads(s)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"head kind must be one of {KINDS}, got {self.kind!r}")
        want = self.hidden_size * (2 if self.kind == "plp" else 1)
        if self.input_dim != want:
            raise ValueError(f"{self.kind} head input_dim {self.input_dim} != {want} for hidden size {self.hidden_size}")
        if self.prompt_feature not in ("pooled", "last"):
            raise ValueError(f"prompt_feature must be pooled or last, got {self.prompt_feature!r}")
        e = self.bin_edges
        if len(e) < 3 or any(b <= a for a, b in zip(e, e[1:])):
            raise ValueError("bin_edges must hold >= 3 strictly increasing values")


def log_bins(max_len: int, n_bins: int = 20, min_len: float = 8.0) -> list[float]:
    """Geometric bin edges from 0 to max_len: long-tailed lengths get relative resolution."""
    inner = [min_len * (max_len / min_len) ** (i / (n_bins - 1)) for i in range(n_bins - 1)]
    return [0.0] + [round(x, 3) for x in inner[1:]] + [float(max_len), float(max_len) * 1.25]


class LengthHead(nn.Module):
    def __init__(self, meta: HeadMeta):
        super().__init__()
        meta.validate()
        self.meta = meta
        hid = meta.hidden_dim or meta.input_dim // 2
        self.net = nn.Sequential(
            nn.Linear(meta.input_dim, hid), nn.LayerNorm(hid), nn.ReLU(), nn.Dropout(meta.dropout),
            nn.Linear(hid, meta.n_bins))
        self.register_buffer("edges", torch.tensor(meta.bin_edges, dtype=torch.float32), persistent=False)
        self.register_buffer("centers", meta.centers, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point estimate and calibrated quantiles (tokens) for a batch of input vectors."""
        w = self.net[0].weight
        p = torch.softmax(self.net(x.to(w.device, w.dtype)).float(), -1)
        cal = self.meta.calibration
        q = quantiles(p, self.edges, (0.5, 0.9))  # both in one pass: the sidecar calls this per batch
        return {
            "mean": p @ self.centers,
            "p50": q[:, 0] * float(cal.get("p50_scale", 1.0)),
            "p90": q[:, 1] * float(cal.get("p90_scale", 1.0)),
        }


def quantile(probs: torch.Tensor, edges: torch.Tensor, q: float) -> torch.Tensor:
    """q-quantile of a binned distribution, linear inside the bin (probs [n, B], edges [B+1])."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], q)).clamp(max=probs.shape[1] - 1).squeeze(1)
    prev = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(idx, dtype=cdf.dtype))
    mass = probs.gather(1, idx[:, None]).squeeze(1).clamp(min=1e-12)
    frac = ((q - prev) / mass).clamp(0, 1)
    lo, hi = edges[idx], edges[idx + 1]
    return lo + frac * (hi - lo)


def quantiles(probs: torch.Tensor, edges: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """Several quantiles at once ([n, len(qs)]); same maths as `quantile`, one cumsum and one
    searchsorted for all of them."""
    cdf = probs.cumsum(-1)
    n, nb = probs.shape
    target = torch.tensor(qs, dtype=cdf.dtype, device=cdf.device).expand(n, len(qs)).contiguous()
    idx = torch.searchsorted(cdf, target).clamp(max=nb - 1)
    prev = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)), torch.zeros((), dtype=cdf.dtype, device=cdf.device))
    mass = probs.gather(1, idx).clamp(min=1e-12)
    frac = ((target - prev) / mass).clamp(0, 1)
    lo, hi = edges[idx], edges[idx + 1]
    return lo + frac * (hi - lo)


# ---------------------------------------------------------------- training maths (seed A)
def bin_index(lengths: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    return (torch.bucketize(lengths.float(), edges[1:-1], right=True)).clamp(0, len(edges) - 2)


def soft_labels(idx: torch.Tensor, n_bins: int) -> torch.Tensor:
    """p_j ∝ exp(-|j - i|): neighbouring bins share probability mass (ordinal smoothing)."""
    j = torch.arange(n_bins, device=idx.device)
    w = torch.exp(-(j[None, :] - idx[:, None]).abs().float())
    return w / w.sum(-1, keepdim=True)


def egtp_loss(logits: torch.Tensor, lengths: torch.Tensor, edges: torch.Tensor, centers: torch.Tensor,
              ce_weight: float = 0.95, mse_weight: float = 0.05) -> torch.Tensor:
    """0.95 * CE(soft labels) + 0.05 * MSE(expected length), the MSE in log1p space so a
    long-tailed target doesn't swamp the classification term."""
    target = soft_labels(bin_index(lengths, edges), logits.shape[-1])
    ce = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    mean = torch.softmax(logits, -1) @ centers
    mse = F.mse_loss(torch.log1p(mean), torch.log1p(lengths.float()))
    return ce_weight * ce + mse_weight * mse


# ---------------------------------------------------------------- checkpoints
def save_head(head: LengthHead, path: str | pathlib.Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(sd, str(path), metadata={"lenpred": head.meta.to_json()})


def load_head(path: str | pathlib.Path, device: str | torch.device = "cpu") -> LengthHead:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lenpred")
    if raw is None:
        raise ValueError(f"{path}: not a lenpred head (no 'lenpred' metadata in the safetensors header)")
    head = LengthHead(HeadMeta.from_json(raw))
    head.load_state_dict(load_file(str(path)))
    return head.to(device).eval()


def random_head(kind: str, hidden_size: int, *, model_id: str = "test/model", layer: int = -1,
                max_len: int = 1024, version: str = "random", seed: int = 0) -> LengthHead:
    """Randomly initialised head: for speed benchmarks and tests, never served by default."""
    torch.manual_seed(seed)
    meta = HeadMeta(kind=kind, model_id=model_id, hidden_size=hidden_size, layer=layer,
                    input_dim=hidden_size * (2 if kind == "plp" else 1), bin_edges=log_bins(max_len),
                    version=version)
    return LengthHead(meta).eval()



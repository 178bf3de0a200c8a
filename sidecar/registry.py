"""Loaded heads, keyed by (model id, hidden size, layer, version); several models side by side."""
from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field

import torch

from lenpred.sidecar.heads import LengthHead, load_head

log = logging.getLogger("lenpred.sidecar")

SHIPPED_HEADS = pathlib.Path(__file__).resolve().parent / "heads"


class HeadLookupError(LookupError):
    """No head matches the selector; the message lists what is loaded."""


@dataclass
class HeadPair:
    """The heads of one (model, width, layer, version): up to two prefill heads and PLP."""

    egtp: LengthHead | None = None
    last: LengthHead | None = None
    plp: LengthHead | None = None

    def heads(self) -> list[LengthHead]:
        return [h for h in (self.egtp, self.last, self.plp) if h is not None]


@dataclass
class HeadRegistry:
    device: torch.device
    dtype: torch.dtype = torch.float32
    """Weights' dtype of every head (bf16 on GPU: its fastest; bin edges and the softmax stay fp32)."""
    pairs: dict[tuple[str, int, int, str], HeadPair] = field(default_factory=dict)

    def add(self, head: LengthHead) -> None:
        m = head.meta
        pair = self.pairs.setdefault(m.key(), HeadPair())
        head = head.to(self.device).eval()
        head.net.to(self.dtype)  # only the layers: edges/centers stay fp32 (bf16 would move bin edges)
        setattr(pair, m.kind, head)

    def load_dir(self, root: str | pathlib.Path) -> int:
        n = 0
        for path in sorted(pathlib.Path(root).rglob("*.safetensors")):
            self.add(load_head(path, self.device))
            log.info("loaded head %s", path)
            n += 1
        return n

    def describe(self) -> str:
        return ", ".join(f"{k[0]} (d={k[1]}, layer={k[2]}, v={k[3]})" for k in self.pairs) or "none"

    def select(self, model_id: str, hidden_size: int, layer: int, version: str = "") -> tuple[tuple, HeadPair]:
        """Exact model/width/layer match; empty version picks the newest by creation time."""
        cands = [(k, p) for k, p in self.pairs.items()
                 if k[0] == model_id and k[2] == layer and (not version or k[3] == version)]
        if not cands:
            raise HeadLookupError(f"unknown model {model_id!r} (layer {layer}"
                                  f"{', version ' + version if version else ''}); loaded heads: {self.describe()}")
        same_width = [(k, p) for k, p in cands if k[1] == hidden_size]
        if not same_width:
            raise HeadLookupError(f"hidden size {hidden_size} does not match model {model_id!r} "
                                  f"(heads expect {sorted({k[1] for k, _ in cands})})")

        def created(kp):
            return max(h.meta.created for h in kp[1].heads())

        return max(same_width, key=created)

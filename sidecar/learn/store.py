"""The on-disk store of one model's live examples, and its control files.

Layout under the learn root, one folder per model key (model id, hidden size, layer):

  <slug>/model.json          the key
  <slug>/segments/seg-*.npz  finished requests, in the `lenpred collect` shard format (so
                             `lenpred train --data <slug>/segments` trains on them directly); one
                             "prompt" row per request, `split_key` = its split group, `cap` and
                             `finish_ts` per request. File names carry the request count.
  <slug>/heads/<version>/    heads the learner promoted (last.safetensors, plp.safetensors)
  <slug>/serving.json        what the sidecar serves: version, heads folder, calibration
  <slug>/state.json          the learner's status (counts, metrics, promotions, rejections)
  <slug>/control.json        the kill switch: {"enabled": false} stops recording and learning

Every JSON write is atomic (temp file + rename), so a reader never sees half a file; segments are
written the same way. Disk is bounded: `evict` deletes the oldest segments beyond max_requests.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import time
from dataclasses import dataclass, field

import numpy as np

SEG_RE = re.compile(r"seg-(\d+)-(\d+)-(\d+)-n(\d+)\.npz$")


@dataclass
class Example:
    """One finished request, ready to store."""
    rid: str
    group: str
    prompt_tokens: int
    last: np.ndarray                 # [d] float16
    pooled: np.ndarray | None        # [d] float16 or None (tap pool off)
    length: int                      # served length min(output, cap)
    capped: bool                     # stopped by max_new_tokens (censored)
    cap: int
    finish_ts: float
    dec_steps: list[int] = field(default_factory=list)
    dec_vecs: list[np.ndarray] = field(default_factory=list)


def slug(model_id: str, hidden_size: int, layer: int) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "--", model_id).strip("-") or "model"
    return f"{s}-d{hidden_size}-L{layer}".replace("L-", "Lm")


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ModelStore:
    def __init__(self, root: str | pathlib.Path, model_id: str, hidden_size: int, layer: int = -1):
        self.model_id, self.hidden_size, self.layer = model_id, int(hidden_size), int(layer)
        self.dir = pathlib.Path(root) / slug(model_id, hidden_size, layer)
        self.segments = self.dir / "segments"
        self.heads = self.dir / "heads"
        self._seq = 0

    @classmethod
    def all(cls, root: str | pathlib.Path) -> list["ModelStore"]:
        out = []
        for p in sorted(pathlib.Path(root).glob("*/model.json")):
            m = json.loads(p.read_text())
            out.append(cls(root, m["model_id"], m["hidden_size"], m["layer"]))
        return out

    @classmethod
    def find(cls, root, model: str) -> "ModelStore":
        """By model id or folder name; LookupError names what exists."""
        stores = cls.all(root)
        hits = [s for s in stores if model in (s.model_id, s.dir.name)]
        if len(hits) != 1:
            have = ", ".join(f"{s.model_id} ({s.dir.name})" for s in stores) or "none"
            raise LookupError(f"model {model!r} {'is ambiguous' if hits else 'not found'} in {root}; recorded: {have}")
        return hits[0]

    def ensure(self) -> "ModelStore":
        self.segments.mkdir(parents=True, exist_ok=True)
        self.heads.mkdir(parents=True, exist_ok=True)
        mj = self.dir / "model.json"
        if not mj.exists():
            atomic_write(mj, json.dumps({"model_id": self.model_id, "hidden_size": self.hidden_size,
                                         "layer": self.layer}).encode())
        return self

    # ------------------------------------------------------------------ json files
    def read(self, name: str, default=None):
        try:
            return json.loads((self.dir / name).read_text())
        except (OSError, ValueError):
            return default

    def write(self, name: str, obj) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / name, json.dumps(obj, indent=1).encode())

    def enabled(self) -> bool:
        return bool((self.read("control.json") or {}).get("enabled", True))

    # ------------------------------------------------------------------ segments
    def segment_files(self) -> list[pathlib.Path]:
        return sorted((p for p in self.segments.glob("seg-*.npz") if SEG_RE.search(p.name)), key=lambda p: p.name)

    def n_requests(self) -> int:
        return sum(int(SEG_RE.search(p.name).group(4)) for p in self.segment_files())

    def write_segment(self, examples: list[Example]) -> pathlib.Path | None:
        if not examples:
            return None
        self.ensure()
        R, d = len(examples), self.hidden_size
        dreq = np.array([i for i, e in enumerate(examples) for _ in e.dec_steps], np.int32)
        dvecs = [v for e in examples for v in e.dec_vecs]
        have_pooled = all(e.pooled is not None for e in examples)
        caps = np.array([e.cap for e in examples], np.int32)
        z = {
            "prompt_id": np.array([f"{os.getpid()}.{self._seq}.{i}:{e.rid}" for i, e in enumerate(examples)]),
            "dataset": np.array(["live"] * R), "text": np.array([""] * R),
            "split_key": np.array([e.group for e in examples]),
            "prompt_tokens": np.array([e.prompt_tokens for e in examples], np.int32),
            "last": np.stack([e.last for e in examples]).astype(np.float16),
            "ent_mean": np.zeros(R, np.float32), "ent_std": np.zeros(R, np.float32),
            "ent_max": np.zeros(R, np.float32), "ent_last": np.zeros(R, np.float32),
            "req_prompt": np.arange(R, dtype=np.int32), "req_sample": np.zeros(R, np.int32),
            "length": np.array([e.length for e in examples], np.int32),
            "capped": np.array([e.capped for e in examples], bool), "cap": caps,
            "finish_ts": np.array([e.finish_ts for e in examples], np.float64),
            "finish_seq": np.arange(R, dtype=np.int64),
            "dec_req": dreq, "dec_step": np.array([s for e in examples for s in e.dec_steps], np.int32),
            "dec_vec": np.stack(dvecs).astype(np.float16) if dvecs else np.zeros((0, d), np.float16),
        }
        if have_pooled:
            z["pooled"] = np.stack([e.pooled for e in examples]).astype(np.float16)
        meta = {"model_id": self.model_id, "hidden_size": d, "layer": self.layer, "prompts": f"live:{self.dir.name}",
                "max_new_tokens": int(caps.max()), "samples": 1, "engine": "live (lenpred sidecar)",
                "every": None, "temperature": None, "top_p": None, "seed": None,
                "command": "recorded by the lenpred sidecar"}
        name = f"seg-{time.time_ns()}-{os.getpid()}-{self._seq:06d}-n{R}.npz"
        self._seq += 1
        path = self.segments / name
        tmp = self.segments / f".{name}.tmp.npz"
        np.savez(tmp, **z, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
        return path

    def evict(self, max_requests: int) -> int:
        """Delete the oldest segments until at most max_requests remain; returns files deleted."""
        files = self.segment_files()
        total = sum(int(SEG_RE.search(p.name).group(4)) for p in files)
        gone = 0
        for p in files:
            if total <= max_requests:
                break
            total -= int(SEG_RE.search(p.name).group(4))
            p.unlink(missing_ok=True)
            gone += 1
        return gone

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file())

"""Loading collected shards, the data hash, and the split by prompt."""
from __future__ import annotations

import bisect
import hashlib
import json
import pathlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Traces:
    """Everything the trainers need, flattened over shards and data folders.

    prompt level [P]: key ("dataset:id"), dataset, text, prompt_tokens, pooled, mean, last, ent_* (4 stats)
    request level [R]: req_prompt (row in P), length (served length, capped at cap), capped, cap,
                       finish_seq (arrival order of the finished event; -1 when not recorded)
    decode rows [M]: dec_req (row in R), dec_step, dec_vec
    Optional: `pooled` is None when the tap's entropy pool was off; `mean` is None when some shard lacks it (engine collections with --prompt-pass none,
    the sidecar's live store); `abl` holds the prompt-level ablation variants (`abl_<name>` arrays)
    when every shard has them.
    """
    key: np.ndarray
    dataset: np.ndarray
    text: np.ndarray
    prompt_tokens: np.ndarray
    pooled: np.ndarray
    mean: np.ndarray
    last: np.ndarray
    ent: np.ndarray
    req_prompt: np.ndarray
    length: np.ndarray
    capped: np.ndarray
    cap: np.ndarray
    dec_req: np.ndarray
    dec_step: np.ndarray
    dec_vec: np.ndarray
    manifests: list
    data_hash: str
    finish_seq: np.ndarray | None = None
    abl: dict | None = None
    split_key: np.ndarray | None = None
    finish_ts: np.ndarray | None = None

    @property
    def split_keys(self) -> np.ndarray:
        """What the split hashes: the recorded split group when present (the sidecar's live store,
        where one prompt may appear as several rows), else the prompt key."""
        return self.split_key if self.split_key is not None else self.key

    @property
    def hidden_size(self) -> int:
        return int(self.last.shape[1])

    @property
    def model_id(self) -> str:
        return self.manifests[0]["model_id"]


def shard_files(dirs: list[str]) -> list[pathlib.Path]:
    files = []
    for d in dirs:
        p = pathlib.Path(d)
        if not p.is_dir():
            raise FileNotFoundError(f"data folder {p} does not exist")
        fs = sorted(p.glob("shard-*.npz")) or sorted(p.glob("seg-*.npz"))  # seg-*: the sidecar's live store
        if not fs:
            fs = sorted(p.glob("*/shard-*.npz"))  # a folder of collection folders
        if not fs:
            raise FileNotFoundError(f"no shard-*.npz in {p} (run `lenpred collect --out {p}` first)")
        files += fs
    return files


def data_hash(files: list[pathlib.Path]) -> str:
    """sha256 over the shards' bytes in sorted-name order (independent of where they live)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.parent.name, f.name)):
        h.update(f.parent.name.encode() + b"/" + f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load(dirs: list[str] | str) -> Traces:
    if isinstance(dirs, str):
        dirs = [d for d in dirs.split(",") if d]
    files = shard_files(dirs)
    parts: dict[str, list] = {}
    manifests, seen = [], set()
    p_off = r_off = 0
    for f in files:
        z = np.load(f, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        if meta["prompts"] not in seen:
            seen.add(meta["prompts"])
            manifests.append(meta)
        P, R = len(z["prompt_id"]), len(z["length"])
        cap = int(meta["max_new_tokens"])
        ds = z["dataset"]
        keys = np.array([f"{a}:{b}" for a, b in zip(ds, z["prompt_id"])])
        add = {
            "key": keys, "dataset": ds, "text": z["text"], "prompt_tokens": z["prompt_tokens"],
            "pooled": z["pooled"] if "pooled" in z.files else None, "mean": z["mean"] if "mean" in z.files else None, "last": z["last"],
            "ent": np.stack([z["ent_mean"], z["ent_std"], z["ent_max"], z["ent_last"]], 1),
            "req_prompt": z["req_prompt"] + p_off,
            "capped": z["capped"], "cap": z["cap"].astype(np.int32) if "cap" in z.files else np.full(R, cap, np.int32),
            "dec_req": z["dec_req"] + r_off, "dec_step": z["dec_step"], "dec_vec": z["dec_vec"],
            "finish_seq": z["finish_seq"] if "finish_seq" in z.files else np.full(R, -1, np.int64),
        }
        add["length"] = np.minimum(z["length"], add["cap"])
        add.update({k: z[k] for k in z.files if k.startswith("abl_")})
        add["split_key"] = z["split_key"] if "split_key" in z.files else None
        add["finish_ts"] = z["finish_ts"] if "finish_ts" in z.files else None
        for k, v in add.items():
            parts.setdefault(k, []).append(v)
        p_off += P
        r_off += R
    n_files = len(files)
    cat = {k: (np.concatenate(v) if len(v) == n_files and all(x is not None for x in v) else None)
           for k, v in parts.items()}
    abl = {k[4:]: cat.pop(k) for k in list(cat) if k.startswith("abl_")}
    abl = {k: v for k, v in abl.items() if v is not None} or None
    d = {m["hidden_size"] for m in manifests}
    if len(d) != 1 or len({m["model_id"] for m in manifests}) != 1:
        raise ValueError(f"data folders mix models/hidden sizes: {[(m['model_id'], m['hidden_size']) for m in manifests]}")
    # the same prompt collected twice (two runs) would leak across a split: keep keys unique
    _, first = np.unique(cat["key"], return_index=True)
    if len(first) != len(cat["key"]):
        raise ValueError("duplicate prompt keys across shards; collect each prompt once per data set")
    return Traces(**cat, abl=abl, manifests=manifests, data_hash=data_hash(files))


SPLITS = ("train", "val", "test")


def split_u(key: str, seed: int = 0) -> float:
    """A key's position in [0, 1): a sha256-keyed hash, independent of file order."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def split_of(key: str, seed: int = 0, frac=(0.7, 0.15, 0.15)) -> str:
    u = split_u(key, seed)
    return "train" if u < frac[0] else "val" if u < frac[0] + frac[1] else "test"


def split_by_prompt(keys: np.ndarray, seed: int = 0, frac=(0.7, 0.15, 0.15)) -> dict[str, np.ndarray]:
    """Deterministic split of prompt keys (never of samples): a keyed hash orders the prompts,
    so the split doesn't depend on file order and a prompt's samples all land in one split."""
    r = np.array([split_u(k, seed) for k in keys])
    tr, va = frac[0], frac[0] + frac[1]
    return {"train": np.nonzero(r < tr)[0], "val": np.nonzero((r >= tr) & (r < va))[0], "test": np.nonzero(r >= va)[0]}


def request_rows(tr: Traces, prompt_rows: np.ndarray) -> np.ndarray:
    return np.nonzero(np.isin(tr.req_prompt, prompt_rows))[0]


def decode_rows(tr: Traces, req_rows: np.ndarray) -> np.ndarray:
    return np.nonzero(np.isin(tr.dec_req, req_rows))[0]


def step_buckets(dec_req: np.ndarray, dec_step: np.ndarray, targets) -> np.ndarray:
    """For each decode row, the target step it stands for: the largest target t <= its step, for
    the first row of each (request, t) only; -1 for the others. The engine tap samples every k-th
    *engine* step, so a request's states sit at t..t+k-1 rather than at t exactly; a collection
    that recorded exact steps maps each row to itself."""
    tg = np.asarray(sorted(targets), np.int64)
    step = np.asarray(dec_step, np.int64)
    i = np.searchsorted(tg, step, side="right") - 1
    b = np.where(i >= 0, tg[np.clip(i, 0, len(tg) - 1)], -1)
    order = np.lexsort((step, b, np.asarray(dec_req)))
    first = np.ones(len(step), bool)
    key = np.stack([np.asarray(dec_req)[order], b[order]], 1)
    first[1:] = (key[1:] != key[:-1]).any(1)
    out = np.full(len(step), -1, np.int64)
    out[order[first]] = b[order[first]]
    return out


def target_step(step: int, targets_sorted: list[int]) -> int | None:
    """The largest target <= step (None if step is before the first): which kept step a decode
    state stands for while recording (see step_buckets)."""
    i = bisect.bisect_right(targets_sorted, step) - 1
    return targets_sorted[i] if i >= 0 else None

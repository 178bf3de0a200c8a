"""Codec for lenpred.v2 columnar batches (proto/v2/lenpred.proto, docs/WIRE.md).

Decoding does no per-row Python work: each column is one `np.frombuffer` over the message's bytes
and the vectors one `torch.frombuffer` (zero copy; the caller copies them once, to the device).
Every length is checked against its block's row count before anything is read, so a malformed
message is refused with a precise reason (WireError) and never half-applied.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lenpred.proto.v2 import lenpred_pb2 as pb2

# torch.frombuffer warns that a `bytes` object is read-only; we never write through these views
# (the sidecar copies them to the device or upcasts them before use).
warnings.filterwarnings("ignore", message="The given buffer is not writable")

DTYPES = {pb2.DTYPE_FLOAT32: torch.float32, pb2.DTYPE_FLOAT16: torch.float16, pb2.DTYPE_BFLOAT16: torch.bfloat16}
TORCH_TO_PB = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
FEATURES = ((pb2.FEATURE_POOLED, "pooled"), (pb2.FEATURE_LAST, "last"))
FLAG_TRUNCATED, FLAG_ABORTED = 1, 2
I4 = np.dtype("<i4")
MAX_DIM = 65536


class WireError(ValueError):
    """A v2 batch is malformed; the message says how."""


@dataclass(frozen=True)
class Limits:
    max_rows: int = 8192          # prefill + decode + finished rows per message
    max_rid_bytes: int = 256      # a bound request id longer than this is refused
    max_binds: int = 8192


@dataclass
class Decoded:
    """A checked v2 batch: numpy columns (views on the message bytes) and one vector tensor."""

    msg: pb2.Batch
    bind_handles: np.ndarray
    bind_rids: list
    prefill_handles: np.ndarray
    prompt_tokens: np.ndarray | None
    prefill_max_new: np.ndarray | None
    features: tuple                   # prefill features in blob order: ("pooled", "last") subset
    decode_handles: np.ndarray
    decode_steps: np.ndarray
    vectors: torch.Tensor             # [rows, dim], wire dtype, zero-copy view
    fin_handles: np.ndarray
    output_tokens: np.ndarray
    fin_prompt_tokens: np.ndarray | None
    fin_flags: np.ndarray | None
    fin_max_new: np.ndarray | None

    @property
    def n_prefill(self) -> int:
        return len(self.prefill_handles)

    @property
    def n_decode(self) -> int:
        return len(self.decode_handles)

    @property
    def n_finished(self) -> int:
        return len(self.fin_handles)

    @property
    def rows(self) -> int:
        return self.n_prefill + self.n_decode + self.n_finished

    def feature_slice(self, feature: str) -> slice:
        i = self.features.index(feature)
        return slice(i * self.n_prefill, (i + 1) * self.n_prefill)

    @property
    def decode_slice(self) -> slice:
        start = len(self.features) * self.n_prefill
        return slice(start, start + self.n_decode)


def _col(raw: bytes, name: str, n: int | None = None, *, optional: bool = False, dtype=I4,
         nonneg: bool = True) -> np.ndarray | None:
    if optional and not raw:
        return None
    if len(raw) % dtype.itemsize:
        raise WireError(f"column {name} is {len(raw)} bytes, not a multiple of {dtype.itemsize}")
    a = np.frombuffer(raw, dtype=dtype)
    if n is not None and len(a) != n:
        raise WireError(f"column {name} has {len(a)} entries for {n} rows")
    if nonneg and len(a) and dtype.kind == "i" and int(a.min()) < 0:
        raise WireError(f"column {name} holds a negative value")
    return a


def decode(msg: pb2.Batch, limits: Limits = Limits()) -> Decoded:
    """Check every column against its row count and the limits; raise WireError with the reason."""
    d = int(msg.head.hidden_size)
    pre = _col(msg.prefill_handles, "prefill_handles")
    dec = _col(msg.decode_handles, "decode_handles")
    fin = _col(msg.finished_handles, "finished_handles")
    n_pre, n_dec, n_fin = len(pre), len(dec), len(fin)
    total = n_pre + n_dec + n_fin
    if total > limits.max_rows:
        raise WireError(f"{total} rows exceed the limit of {limits.max_rows} per message")
    binds = _col(msg.bind_handles, "bind_handles")
    if len(binds) != len(msg.bind_rids):
        raise WireError(f"bind_handles has {len(binds)} entries for {len(msg.bind_rids)} bind_rids")
    if len(binds) > limits.max_binds:
        raise WireError(f"{len(binds)} bindings exceed the limit of {limits.max_binds} per message")
    for rid in msg.bind_rids:
        if not rid or len(rid) > limits.max_rid_bytes:
            raise WireError(f"request id of {len(rid)} characters (1..{limits.max_rid_bytes} allowed)")
    features = tuple(name for bit, name in FEATURES if msg.prefill_features & bit)
    if msg.prefill_features & ~(pb2.FEATURE_POOLED | pb2.FEATURE_LAST):
        raise WireError(f"unknown prefill_features bits {msg.prefill_features}")
    if n_pre and not features:
        raise WireError("prefill rows need prefill_features (pooled and/or last)")
    vec_rows = n_pre * len(features) + n_dec
    if vec_rows:
        if msg.dtype not in DTYPES:
            raise WireError(f"unsupported dtype {msg.dtype} (float32, float16 and bfloat16 are accepted)")
        if not 0 < d <= MAX_DIM:
            raise WireError(f"head.hidden_size {d} out of range 1..{MAX_DIM}")
        dt = DTYPES[msg.dtype]
        need = vec_rows * d * _ITEMSIZE[dt]
        if len(msg.vectors) != need:
            raise WireError(f"vectors are {len(msg.vectors)} bytes but {vec_rows} rows x {d} need {need}")
        vectors = torch.frombuffer(msg.vectors, dtype=dt).view(vec_rows, d)
    else:
        if msg.vectors:
            raise WireError(f"vectors are {len(msg.vectors)} bytes but no row needs a vector")
        vectors = torch.empty(0, max(d, 1))
    return Decoded(
        msg=msg, bind_handles=binds, bind_rids=list(msg.bind_rids), prefill_handles=pre,
        prompt_tokens=_col(msg.prompt_tokens, "prompt_tokens", n_pre, optional=True),
        prefill_max_new=_col(msg.prefill_max_new_tokens, "prefill_max_new_tokens", n_pre, optional=True),
        features=features, decode_handles=dec, decode_steps=_col(msg.decode_steps, "decode_steps", n_dec),
        vectors=vectors, fin_handles=fin, output_tokens=_col(msg.output_tokens, "output_tokens", n_fin),
        fin_prompt_tokens=_col(msg.finished_prompt_tokens, "finished_prompt_tokens", n_fin, optional=True),
        fin_flags=_col(msg.finished_flags, "finished_flags", n_fin, optional=True, dtype=np.dtype("u1")),
        fin_max_new=_col(msg.finished_max_new_tokens, "finished_max_new_tokens", n_fin, optional=True),
    )


def _i4(x) -> bytes:
    return np.ascontiguousarray(x, dtype=I4).tobytes() if x is not None and len(x) else b""


def raw_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    """A tensor's rows as little-endian bytes of `dtype` (bf16 as its 16-bit pattern)."""
    t = t.detach().to("cpu", dtype).contiguous()
    return (t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy().tobytes()


def encode(head: pb2.HeadSelector, seq: int = 0, *, engine_id: str = "", binds: tuple = ((), ()),
           prefill_handles=(), prompt_tokens=None, prefill_max_new=None, prefill: dict | None = None,
           decode_handles=(), decode_steps=(), decode=None, finished_handles=(), output_tokens=(),
           finished_prompt_tokens=None, finished_flags=None, finished_max_new=None,
           dtype: torch.dtype = torch.float16, blob: bytes | None = None, features: int | None = None) -> pb2.Batch:
    """Build a v2 batch from columns. `prefill` maps feature name -> [n_prefill, d] tensor; or pass
    `blob` + `features` when the vector bytes are already laid out (the tap's zero-re-encode path)."""
    msg = pb2.Batch(head=head, seq=seq, engine_id=engine_id, dtype=TORCH_TO_PB[dtype])
    bh, br = binds
    msg.bind_handles = _i4(bh)
    msg.bind_rids.extend(br)
    msg.prefill_handles = _i4(prefill_handles)
    msg.prompt_tokens = _i4(prompt_tokens)
    msg.prefill_max_new_tokens = _i4(prefill_max_new)
    msg.decode_handles = _i4(decode_handles)
    msg.decode_steps = _i4(decode_steps)
    msg.finished_handles = _i4(finished_handles)
    msg.output_tokens = _i4(output_tokens)
    msg.finished_prompt_tokens = _i4(finished_prompt_tokens)
    if finished_flags is not None and len(finished_flags):
        msg.finished_flags = np.asarray(finished_flags, dtype=np.uint8).tobytes()
    msg.finished_max_new_tokens = _i4(finished_max_new)
    if blob is not None:
        msg.prefill_features = features or 0
        msg.vectors = blob
        return msg
    parts, bits = [], 0
    for bit, name in FEATURES:
        if prefill and name in prefill:
            bits |= bit
            parts.append(raw_bytes(prefill[name], dtype))
    if decode is not None and len(decode):
        parts.append(raw_bytes(decode, dtype))
    msg.prefill_features = bits
    msg.vectors = b"".join(parts)
    return msg

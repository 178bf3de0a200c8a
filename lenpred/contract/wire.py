"""Tensor <-> bytes codec for lenpred.v1 (raw little-endian rows, never `repeated float`)."""
from __future__ import annotations

import numpy as np
import torch

from lenpred.proto.v1 import lenpred_pb2 as pb

_NP = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}
_TORCH_TO_PB = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
}


class WireError(ValueError):
    """A tensor on the wire is malformed; the message says how."""


def encode(t: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> pb.Tensor:
    """Encode a [rows, dim] tensor. bf16 goes as its raw 16-bit pattern."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    t = t.detach().to("cpu", dtype).contiguous()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    raw = t.view(torch.int16) if dtype == torch.bfloat16 else t
    return pb.Tensor(dtype=_TORCH_TO_PB[dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def decode(msg: pb.Tensor, *, max_rows: int | None = None) -> torch.Tensor:
    """Decode to a float32 [rows, dim] tensor; raise WireError with a precise reason."""
    if len(msg.shape) != 2:
        raise WireError(f"tensor must be 2-D [rows, dim], got shape {list(msg.shape)}")
    rows, dim = msg.shape
    if max_rows is not None and rows > max_rows:
        raise WireError(f"{rows} rows exceed the limit of {max_rows} per message")
    if msg.dtype == pb.DTYPE_BFLOAT16:
        itemsize = 2
    elif msg.dtype in _NP:
        itemsize = _NP[msg.dtype].itemsize
    else:
        raise WireError(f"unsupported dtype {msg.dtype} (float32, float16 and bfloat16 are accepted)")
    expected = rows * dim * itemsize
    if len(msg.data) != expected:
        raise WireError(f"tensor data is {len(msg.data)} bytes but shape {rows}x{dim} needs {expected}")
    if msg.dtype == pb.DTYPE_BFLOAT16:
        raw = np.frombuffer(msg.data, dtype="<i2").reshape(rows, dim)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).float()
    arr = np.frombuffer(msg.data, dtype=_NP[msg.dtype]).reshape(rows, dim)
    return torch.from_numpy(arr.astype(np.float32))

"""Tap-side encoding of one engine step for the wire the sidecar speaks (docs/WIRE.md).

The tap builds a lenpred.v1 IngestBatch per step (tap/core.py); on a lenpred.v2 stream the sender
thread turns it into a columnar v2 Batch here, off the engine's step loop: request ids become
stream-local int32 handles (the rid travels once, as a binding, on the request's first row of the
stream), per-row numbers become packed little-endian columns, and the vector blocks, already raw
little-endian bytes, are concatenated into one blob without re-encoding.

`wire_mode()` reads LENPRED_TAP_WIRE: `v2`, `v1`, or `auto` (default: v2, falling back to v1 when
the sidecar answers UNIMPLEMENTED, i.e. it predates v2).
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import torch

from lenpred.contract import wire, wire_v2
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v2 import lenpred_pb2 as pb2

MODES = ("auto", "v2", "v1")
_V1_TO_V2_DTYPE = {pb.DTYPE_FLOAT32: pb2.DTYPE_FLOAT32, pb.DTYPE_FLOAT16: pb2.DTYPE_FLOAT16,
                   pb.DTYPE_BFLOAT16: pb2.DTYPE_BFLOAT16}


def wire_mode(value: str | None = None) -> str:
    v = (value if value is not None else os.environ.get("LENPRED_TAP_WIRE", "auto")).strip().lower() or "auto"
    if v not in MODES:
        raise ValueError(f"LENPRED_TAP_WIRE must be one of {MODES}, got {v!r}")
    return v


class V2Encoder:
    """Encodes v1 batches as v2 for ONE stream: make a new encoder for every new stream (the
    sidecar's handle -> rid map lives and dies with the stream)."""

    def __init__(self, max_handles: int = 262144):
        self.handles: dict[str, int] = {}
        self._next = 0
        # the sidecar keeps at most this many bindings per stream (SidecarConfig.max_stream_handles);
        # a request whose binding is dropped here is simply bound again on its next row
        self.max_handles = max_handles

    def _handles(self, rids, bh: list, br: list) -> list[int]:
        out = []
        for rid in rids:
            h = self.handles.get(rid)
            if h is None:
                h = self.handles[rid] = self._next
                self._next = (self._next + 1) & 0x7FFFFFFF
                bh.append(h)
                br.append(rid)
            out.append(h)
        return out

    def encode(self, b: pb.IngestBatch) -> pb2.Batch:
        bh: list[int] = []
        br: list[str] = []
        pre = self._handles(b.prefill.rids, bh, br)
        dec = self._handles(b.decode.rids, bh, br)
        fin = self._handles([f.rid for f in b.finished], bh, br)
        blocks, features = [], 0
        if pre:
            if b.prefill.HasField("vectors"):
                blocks.append(b.prefill.vectors)
                features |= pb2.FEATURE_POOLED
            if b.prefill.HasField("last_vectors"):
                blocks.append(b.prefill.last_vectors)
                features |= pb2.FEATURE_LAST
        if dec:
            blocks.append(b.decode.vectors)
        dtypes = {t.dtype for t in blocks}
        if len(dtypes) <= 1:  # the usual case: one dtype, the bytes are concatenated as they are
            dtype = _V1_TO_V2_DTYPE.get(dtypes.pop(), pb2.DTYPE_UNSPECIFIED) if dtypes else pb2.DTYPE_FLOAT16
            blob = b"".join(t.data for t in blocks)
        else:  # mixed dtypes in one step: decode and send fp32 (rare; correctness over speed)
            dtype = pb2.DTYPE_FLOAT32
            blob = b"".join(wire_v2.raw_bytes(wire.decode(t), torch.float32) for t in blocks)
        fins = b.finished
        msg = wire_v2.encode(
            pb2.HeadSelector(model_id=b.head.model_id, hidden_size=b.head.hidden_size, layer=b.head.layer,
                             version=b.head.version),
            b.seq, engine_id=b.engine_id, binds=(bh, br),
            prefill_handles=pre, prompt_tokens=list(b.prefill.prompt_tokens) or None,
            prefill_max_new=list(b.prefill.max_new_tokens) or None,
            decode_handles=dec, decode_steps=list(b.decode.steps),
            finished_handles=fin, output_tokens=[f.output_tokens for f in fins],
            finished_prompt_tokens=[f.prompt_tokens for f in fins] or None,
            finished_flags=np.array([int(f.truncated) | (int(f.aborted) << 1) for f in fins], np.uint8),
            finished_max_new=[f.max_new_tokens for f in fins] or None,
            blob=blob, features=features)
        msg.dtype = dtype
        for f in fins:  # the sidecar releases a handle with its finished row
            self.handles.pop(f.rid, None)
        over = len(self.handles) - self.max_handles
        if over > 0:  # requests that never finished (no event): forget the oldest bindings
            for rid in list(itertools.islice(self.handles, over)):
                del self.handles[rid]
        return msg

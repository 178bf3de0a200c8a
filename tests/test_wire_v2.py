"""lenpred.v2 codec: round trip, and every malformed column refused with its reason (table-driven)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lenpred.contract import wire_v2
from lenpred.proto.v2 import lenpred_pb2 as pb2

D = 8
HEAD = pb2.HeadSelector(model_id="m", hidden_size=D, layer=-1)


def good(**kw) -> pb2.Batch:
    args = dict(binds=([0, 1, 2], ["a", "b", "c"]), prefill_handles=[0, 1], prompt_tokens=[5, 6],
                prefill={"pooled": torch.randn(2, D), "last": torch.randn(2, D)},
                decode_handles=[2], decode_steps=[4], decode=torch.randn(1, D),
                finished_handles=[2], output_tokens=[9], finished_flags=[1], dtype=torch.float16)
    args.update(kw)
    return wire_v2.encode(HEAD, 7, **args)


def test_roundtrip_layout_and_dtypes():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        pool, last, dec = torch.randn(2, D), torch.randn(2, D), torch.randn(1, D)
        m = good(prefill={"pooled": pool, "last": last}, decode=dec, dtype=dt)
        d = wire_v2.decode(pb2.Batch.FromString(m.SerializeToString()))
        assert (d.n_prefill, d.n_decode, d.n_finished) == (2, 1, 1) and d.features == ("pooled", "last")
        assert d.bind_rids == ["a", "b", "c"] and d.decode_steps.tolist() == [4]
        assert d.vectors.dtype == dt and d.vectors.shape == (5, D)
        for want, sl in ((pool, d.feature_slice("pooled")), (last, d.feature_slice("last")), (dec, d.decode_slice)):
            assert torch.allclose(d.vectors[sl].float(), want.to(dt).float())
        assert d.fin_flags.tolist() == [wire_v2.FLAG_TRUNCATED]


def _set(field, value):
    def f(m):
        setattr(m, field, value)
    return f


CASES = [
    ("truncated vectors", lambda m: _set("vectors", m.vectors[:-2])(m), "vectors are"),
    ("extra vector bytes", lambda m: _set("vectors", m.vectors + b"\0\0")(m), "vectors are"),
    ("truncated column", lambda m: _set("decode_steps", m.decode_steps[:-1])(m), "multiple of 4"),
    ("steps length != rows", _set("decode_steps", np.array([1, 2], "<i4").tobytes()), "decode_steps has 2 entries"),
    ("prompt_tokens length", _set("prompt_tokens", np.array([1], "<i4").tobytes()), "prompt_tokens has 1"),
    ("finished flags length", _set("finished_flags", b"\1\1"), "finished_flags has 2"),
    ("bind count mismatch", lambda m: m.bind_rids.append("extra"), "bind_handles has 3 entries for 4"),
    ("negative handle", _set("decode_handles", np.array([-1], "<i4").tobytes()), "negative"),
    ("negative steps", _set("decode_steps", np.array([-5], "<i4").tobytes()), "negative"),
    ("bad dtype", _set("dtype", 9), "unsupported dtype"),
    ("unspecified dtype", _set("dtype", 0), "unsupported dtype"),
    ("zero hidden size", lambda m: setattr(m.head, "hidden_size", 0), "out of range"),
    ("huge hidden size", lambda m: setattr(m.head, "hidden_size", 1 << 20), "out of range"),
    ("no features", _set("prefill_features", 0), "prefill_features"),
    ("unknown feature bit", _set("prefill_features", 8), "unknown prefill_features"),
    ("empty rid", lambda m: m.bind_rids.__setitem__(0, ""), "request id of 0"),
    ("oversized rid", lambda m: m.bind_rids.__setitem__(0, "x" * 300), "request id of 300"),
    ("too many rows", _set("finished_handles", np.zeros(200, "<i4").tobytes()), "exceed the limit"),
    ("vectors without rows", lambda m: (_set("prefill_handles", b"")(m), _set("prompt_tokens", b"")(m),
                                        _set("decode_handles", b"")(m), _set("decode_steps", b"")(m)), "no row needs"),
]


@pytest.mark.parametrize("name,mutate,reason", CASES, ids=[c[0] for c in CASES])
def test_malformed_is_refused_with_reason(name, mutate, reason):
    m = good()
    mutate(m)
    raw = pb2.Batch.FromString(m.SerializeToString())
    with pytest.raises(wire_v2.WireError, match=reason):
        wire_v2.decode(raw, wire_v2.Limits(max_rows=100, max_rid_bytes=256))


def test_generated_v2_stubs_are_up_to_date(tmp_path):
    import pathlib

    from lenpred.proto import gen

    gen.generate(tmp_path, "v2")
    committed = pathlib.Path(gen.__file__).parent / "v2"
    for name in gen.GENERATED:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), f"{name} is stale: run python proto/gen.py"

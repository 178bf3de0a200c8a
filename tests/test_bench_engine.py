"""`lenpred bench engine` at a tiny size on CPU: real SGLang servers (vanilla and the tap), the real
workload and metrics path, the counting sink. Speed is not asserted (speed goals live in the
benchmark's own output, docs/RESULTS.md); what is asserted is that every variant served the same
work, that the tap variant shipped rows with no errors, and that the JSON has the fields the GPU
report is read from."""
from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("sglang")

from lenpred.bench import engine  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow]


def test_bench_engine_vanilla_vs_tap_on_cpu(tmp_path):
    out = tmp_path / "engine.json"
    rc = engine.main(["--device", "cpu", "--variants", "vanilla,tap", "--prefill", "2x48",
                      "--decode", "2x16", "--reps", "1", "--json", str(out), "--md", str(tmp_path / "e.md")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["environment"]["sglang"] == "0.5.23" and res["environment"]["cuda_graph"] is False
    rows = {r["label"]: r for r in res["results"]}
    assert set(rows) == {"vanilla", "tap"}
    for r in rows.values():
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert len(r["prefill_reps_tok_s"]) == len(r["decode_reps_tok_s"]) == 1
    assert rows["vanilla"]["prefill_vs_vanilla"] == 1.0
    tap = rows["tap"]
    # warm-up + one repetition: 2 shapes x 2 rounds x 2 requests (+ SGLang's own start-up request)
    assert tap["tap_rows"]["prefill"] == tap["tap_rows"]["finished"] >= 8
    assert tap["tap_rows"]["decode"] > 0            # every 8th decode step of 2 x 16 tokens
    assert tap["tap_errors_logged"] == 0
    assert "TapStats" in tap["tap_last_stats"]
    assert "| tap |" in (tmp_path / "e.md").read_text()


@pytest.mark.parametrize("text,err", [("32x2048", None), ("0x5", "must be >= 1"), ("32", "must look like"),
                                      ("ax2", "must look like")])
def test_shape_arguments(text, err):
    if err is None:
        s = engine.parse_shape("prefill", text)
        assert (s.requests, s.prompt_len, s.output_len, s.tokens) == (32, 2048, 1, 65536)
        d = engine.parse_shape("decode", "128x256")
        assert (d.requests, d.prompt_len, d.output_len, d.tokens) == (128, 64, 256, 32768)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=err):
            engine.parse_shape("prefill", text)


def test_histogram_quantiles_between_two_scrapes():
    before = {0.1: 1.0, 0.2: 2.0, 0.4: 2.0, float("inf"): 2.0}
    after = {0.1: 1.0, 0.2: 6.0, 0.4: 10.0, float("inf"): 12.0}
    # 10 new observations: 0 in (0, 0.1], 4 in (0.1, 0.2], 4 in (0.2, 0.4], 2 above 0.4
    assert engine.quantile(before, after, 0.2) == pytest.approx(0.15)
    assert engine.quantile(before, after, 0.6) == pytest.approx(0.3)
    assert engine.quantile(before, after, 0.99) == 0.4  # in the +Inf bucket: its lower bound
    assert engine.quantile(after, after, 0.5) is None    # nothing observed

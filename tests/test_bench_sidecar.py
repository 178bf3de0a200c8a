"""`lenpred bench sidecar` end to end at a tiny size on CPU: no-op bound and sidecar in the same run,
two sidecar processes on one port (SO_REUSEPORT), a real Redis counted from Redis, both wires.
Speed is not asserted (benchmarks, not timed tests): only that every row is complete and sane."""
from __future__ import annotations

import json

from lenpred.bench import sidecar as bench

FIELDS = ("rows_per_s", "noop_rows_per_s", "ratio", "ack_p50_ms", "ack_p99_ms", "redis", "processes", "streams",
          "hidden", "device")


def test_bench_sidecar_tiny_cpu_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--device", "cpu", "--hidden", "16", "--rows", "4", "--seconds", "1", "--streams", "2",
                       "--processes", "2", "--redis", "--wire", "v1,v2", "--json", str(out),
                       "--md", str(tmp_path / "r.md")]) == 0
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [r["wire"] for r in rows] == ["v1", "v2"]
    for r in rows:
        assert all(k in r for k in FIELDS), r
        assert r["errors"] == [] and r["rows_per_s"] > 0 and r["noop_rows_per_s"] > 0 and 0 < r["ratio"]
        assert r["processes"] == 2 and r["streams"] == 2 and r["redis"] is True and r["device"] == "cpu"
        assert r["redis_predictions_stored"] > 0 and r["redis_keys"] > 0  # counted in Redis itself
    assert "noop_rows_per_s" in (tmp_path / "r.md").read_text()

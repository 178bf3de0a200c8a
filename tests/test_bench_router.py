"""`lenpred bench router` end to end at a tiny size: real stub backends, the real router process,
the real load generator (speed is not asserted: speed goals live in benchmarks)."""
from __future__ import annotations

import json

from lenpred.bench import router_overhead


def test_bench_router_runs_direct_and_lenpred(tmp_path):
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    rc = router_overhead.main(["--backends", "2", "--duration", "1", "--concurrency", "4", "--rate", "50",
                               "--targets", "direct,lenpred", "--json", str(out), "--md", str(md)])
    assert rc == 0
    result = json.loads(out.read_text())
    by = {t["target"]: t for t in result["targets"]}
    assert set(by) == {"direct", "lenpred"}
    for t in by.values():
        assert "error" not in t, t
        assert t["closed"]["requests"] > 0 and t["closed"]["errors"] == 0
        assert t["open"]["requests"] > 0 and t["open"]["errors"] == 0
    text = md.read_text()
    assert "added_p99_ms" in text and "| lenpred |" in text


def test_bench_queue_and_soak_run_at_a_tiny_size(tmp_path):
    from lenpred.bench import queue, soak

    assert queue.main(["--n", "200", "--samples", "20", "--json", str(tmp_path / "q.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert set(q["queues"]) == {"heap (router)", "sorted list (before)"}
    assert soak.main(["--minutes", "0.1", "--rate", "5", "--sample-s", "2", "--json", str(tmp_path / "s.json"),
                      "--md", str(tmp_path / "s.md")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert len(s["samples"]) >= 3 and s["requests"]["sent"] > 10 and s["requests"]["failed"] == 0
    assert s["samples"][-1]["redis_keys"] > 0 and "router RSS" in (tmp_path / "s.md").read_text()

"""`lenpred bench schedule-real` end to end on CPU, small: the same code path the GPU run takes.

Real SGLang 0.5.23 replicas (SmolLM2, CPU) with the tap, a real Redis, the injecting sidecar on the
taps' gRPC streams, the real router per policy, exact answer lengths through the EOS logit
processor; plus the real-weights spine (real sidecar, real predictions) on one replica. Timing
numbers are not asserted (2 shared CPU cores): only that every request ran, with its trace length,
and that the predictions flowed."""
from __future__ import annotations

import json
import pathlib

import pytest

pytest.importorskip("sglang")

from lenpred.bench.real import cli  # noqa: E402
from lenpred.model import hf_checkpoint  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow]
# ../shared/data beside the checkout (a worktree may sit deeper: the nearest ancestor that has it)
SHAREGPT = next((d / "shared" / "data" / "sharegpt" / "first_turn.jsonl" for d in pathlib.Path(__file__).resolve().parents
                 if (d / "shared" / "data").is_dir()), pathlib.Path("../shared/data/sharegpt/first_turn.jsonl"))


def test_schedule_real_on_cpu(tmp_path):
    if not SHAREGPT.exists():
        pytest.skip(f"{SHAREGPT} not found (../shared/data)")
    subset = tmp_path / "sharegpt.jsonl"
    subset.write_text("\n".join(SHAREGPT.read_text().split("\n")[:300]) + "\n")
    out = tmp_path / "out"
    code = cli.main([
        "--device", "cpu", "--replicas", "2", "--trace", f"sharegpt:{subset}", "--tokenizer", str(hf_checkpoint()),
        "--length-scale", "16", "--max-total-tokens", "4096", "--pool", "200", "--batch-n", "20", "--rate", "0.6",
        "--online-s", "8",
        "--warmup-s", "1", "--drain-s", "240", "--over", "0", "--only", "vanilla,round-robin,predicted-slo,lpt",
        "--slo-ttft-s", "30", "--smol-model", str(hf_checkpoint()), "--smol-prompts", str(subset),
        "--smol-replicas", "1", "--smol-n", "3", "--smol-rate", "1", "--smol-max-tokens", "12",
        "--out", str(out), "--log-dir", str(tmp_path / "logs")])
    res = json.loads((out / "schedule_cpu.json").read_text())
    raw = json.loads((out / "schedule_cpu_raw.json").read_text())
    assert code == 0, res["errors"]
    assert res["length_control"]["mode"] == "eos" and res["length_control"]["check"]["eos"]["wrong"] == 0
    assert [r["label"] for r in res["rows"]] == ["vanilla", "round-robin", "lpt", "predicted-slo"]   # plan order
    for row in res["rows"]:
        assert row["completed"] == row["requests"] > 0, row
        assert row["length_errors"] == 0, row
        assert row["quiesced"], row
    online = [r for r in res["rows"] if r["mode"] == "online"]
    assert all(r["tpot_p99_ms"] and r["ttft_p50_s"] is not None and "goodput_rps" in r for r in online)
    assert res["slo"]["source"].startswith("given") or "round-robin" in res["slo"]["source"]
    inj = res["injector"]
    assert inj["prefill"] > 0 and inj["by_cap"] > 0 and inj["decode"] > 0 and inj["errors"] == []
    assert inj["length_mismatch"] == 0
    assert inj["by_prompt"] == 20 and inj["probe_mismatch"] == 0   # every LPT probe matched to its own item
    assert inj["by_max_new_tokens"] <= 2     # only the engines' own start-up warm-up requests (no item yet)
    loads = raw["runs"]["round-robin"]["loads"]
    assert loads and any(s["decode_moments"] for s in loads)      # calibration material is there
    e2e = res["smollm2_e2e"]
    assert "error" not in e2e, e2e.get("error")
    assert e2e["predicted"] == e2e["answered"] == 3                # real predictions for every answer
    assert (out / "schedule_cpu.md").read_text().startswith("### `lenpred bench schedule-real`")

"""`lenpred bench learn` end to end, small: traces in the collect format are replayed through a real
sidecar process (real gRPC, real Redis, the learner as its own process) from a cold start; the JSON
carries the offline and online MAE, the coverage and the curve with head versions. The vectors are
synthetic but learnable (length = a fixed function of the prompt vector): the real-trace numbers
come from the committed run (docs/results/learn_smollm2.json)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lenpred.bench import learn as bench_learn
from lenpred.train.collect_sglang import ShardWriter

pytestmark = pytest.mark.slow
D, CAP = 16, 256


def write_traces(out, n_prompts=180, k=2):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(D)
    man = {"model_id": "test/bench-learn", "hidden_size": D, "prompts": "synthetic", "max_new_tokens": CAP,
           "samples": k, "layer": -1}
    out.mkdir(parents=True)
    sw = ShardWriter(out, 1 << 20, man)
    seq = 0
    for p in range(n_prompts):
        x = rng.standard_normal(D)
        base = np.exp(3.5 + 0.8 * x[0])
        L = np.minimum(CAP, np.maximum(2, base * np.exp(rng.normal(0, 0.05, k)))).astype(int)
        steps = [(j, s) for j in range(2) for s in (8, 16, 32) if s < L[j]]
        sw.add({"prompt_id": str(p), "dataset": "synthetic", "text": "", "prompt_tokens": 20 + p,
                "pooled": x.astype(np.float16), "last": x.astype(np.float16), "ent_mean": 0.0,
                "length": L, "capped": L >= CAP, "finish_seq": np.arange(seq, seq + k),
                "dec_req": np.array([j for j, _ in steps], np.int32), "dec_step": np.array([s for _, s in steps], np.int32),
                "dec_vec": np.array([(x * (1 - s / 64)) for _, s in steps], np.float16).reshape(-1, D)})
        seq += k
    sw.flush()
    return out


def test_bench_learn_cold_start_replay(tmp_path):
    data = write_traces(tmp_path / "traces")
    out = tmp_path / "learn.json"
    cfg = {"min_finished": 120, "retrain_every": 120, "epochs": 200, "plp_epochs": 5, "coverage_band": [0.6, 1.0],
           "poll_s": 0.3, "calib_every": 40}
    rc = bench_learn.main(["--data", str(data), "--json", str(out), "--eval-every", "60", "--learn-config", json.dumps(cfg),
                           "--work", str(tmp_path / "work"), "--sync-timeout", "240"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["finished"] == 360 and r["test_requests"] > 0
    assert r["offline_mae"] > 0 and r["online_mae"] is not None and 0 <= r["p90_coverage"] <= 1
    assert r["curve"][0]["head_version"] is None            # cold start: nothing served, router fallback
    assert r["curve"][-1]["head_version"].startswith("online-") and r["first_served_at"] == 120
    assert len(r["promotions"]) >= 1 and r["ingest"]["rejected"] == 0
    assert out.with_suffix(".md").exists()


def test_train_then_bench_accuracy_on_existing_traces(tmp_path):
    """The Qwen table's path: `lenpred train` on collected shards, then `lenpred bench accuracy --data`
    on the heads' test split (noise floor, served head vs text baselines, PLP vs the served static head)."""
    from lenpred.bench import accuracy
    from lenpred.train import train

    data = write_traces(tmp_path / "traces", n_prompts=120, k=3)
    heads = tmp_path / "heads"
    assert train.main(["--data", str(data), "--out", str(heads), "--report", str(tmp_path / "rep"), "--epochs", "60",
                       "--plp-epochs", "5", "--skip", "proxy-minilm"]) == 0
    out = tmp_path / "acc.json"
    assert accuracy.main(["--data", str(data), "--heads", str(heads), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"egtp", "last-token-head", "const-median", "prompt-length"} <= set(r["methods"])
    assert r["noise_floor"]["n"] == r["n_requests"] and r["noise_floor"]["loo_median_mae"] >= 0
    assert r["served_vs_text_baselines"]["served"] in ("egtp", "last-token-head")
    assert set(r["plp"]["ratio_to_served_static_by_tokens"]) >= {"0", "8", "16"}
    assert r["split_file"].endswith("split.json") and out.with_suffix(".md").exists()

"""Prompt-file adapters and their errors; split by prompt (no leakage); train/eval CLIs on a small
synthetic collection with the real shard schema."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from lenpred.train.data import load, request_rows, split_by_prompt
from lenpred.train.prompts import PromptFileError, load_prompts

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


def test_not_jsonl_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n\nthis is not json\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:3: not JSON lines"):
        load_prompts(f)


def test_no_recognisable_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "hi"}\n')
    with pytest.raises(PromptFileError, match=r":1: no recognisable prompt field.*\['text'\]"):
        load_prompts(f)


def test_wrong_field_for_explicit_format(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(PromptFileError, match=r":2: format 'plain' needs a non-empty 'prompt'"):
        load_prompts(f, "plain")
    with pytest.raises(PromptFileError, match="holds no records"):
        (tmp_path / "e.jsonl").write_text("\n")
        load_prompts(tmp_path / "e.jsonl")
    with pytest.raises(PromptFileError, match=r"expected a JSON object"):
        (tmp_path / "l.jsonl").write_text("[1, 2]\n")
        load_prompts(tmp_path / "l.jsonl")


def test_plain_formats(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps(
        {"id": "x", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "drop me"}]}) + "\n")
    ps = load_prompts(f)
    assert ps[0].messages == [{"role": "user", "content": "hello"}]
    assert ps[1].id == "x" and [m["role"] for m in ps[1].messages] == ["system", "user"]


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
@pytest.mark.parametrize("rel,fmt,probe", [
    ("sharegpt/first_turn.jsonl", "sharegpt", None),
    ("gsm8k/train.jsonl", "gsm8k", "Natalia"),
    ("general/self_instruct_seed_tasks.jsonl", "self-instruct", "breakfast"),
    ("general/mt_bench_questions.jsonl", "mt-bench", "Hawaii"),
    ("general/vicuna_bench_questions.jsonl", "vicuna-bench", "time management"),
])
def test_shared_data_adapters(rel, fmt, probe):
    auto = load_prompts(SHARED / rel, "auto", limit=3)
    explicit = load_prompts(SHARED / rel, fmt, limit=3)
    assert [p.messages for p in auto] == [p.messages for p in explicit]
    assert all(p.text.strip() for p in auto)
    if probe:
        assert probe in auto[0].text


def test_split_by_prompt_has_no_leakage():
    keys = np.array([f"ds:{i}" for i in range(1000)])
    sp = split_by_prompt(keys, seed=0)
    sets = {k: set(keys[v]) for k, v in sp.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sum(len(s) for s in sets.values()) == 1000
    assert 0.6 < len(sets["train"]) / 1000 < 0.8
    # deterministic and independent of order
    sp2 = split_by_prompt(keys[::-1], seed=0)
    assert set(keys[::-1][sp2["test"]]) == sets["test"]
    assert set(keys[split_by_prompt(keys, seed=1)["test"]]) != sets["test"]


def _fake_collection(root: pathlib.Path, n_prompts=60, K=3, d=16, cap=64, seed=0):
    """Shards with the collector's schema: lengths depend on the pooled vector; K samples/prompt."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"model_id": "test/model", "hidden_size": d, "layer": -1, "prompts": str(root / "p.jsonl"),
            "max_new_tokens": cap, "samples": K, "temperature": 0.7, "top_p": 0.95, "every": 4, "seed": seed,
            "command": "fake"}
    for s in range(2):
        P = n_prompts // 2
        pooled = rng.normal(size=(P, d)).astype(np.float16)
        base = np.exp(2.5 + 0.7 * pooled[:, 0].astype(np.float32))
        length = np.clip(np.repeat(base, K) * rng.lognormal(0, 0.1, P * K), 1, cap).astype(np.int32)
        capped = length >= cap
        dec_req, dec_step = [], []
        for r, L in enumerate(length):
            for t in range(4, int(L), 4):
                dec_req.append(r)
                dec_step.append(t)
        np.savez(root / f"shard-{s:05d}.npz", prompt_id=np.array([f"p{s}-{i}" for i in range(P)]),
                 dataset=np.array(["fake"] * P), text=np.array([f"prompt {s} {i}" for i in range(P)]),
                 prompt_tokens=rng.integers(10, 100, P).astype(np.int32), pooled=pooled,
                 mean=rng.normal(size=(P, d)).astype(np.float16), last=pooled,
                 ent_mean=np.ones(P, np.float32), ent_std=np.ones(P, np.float32), ent_max=np.ones(P, np.float32),
                 ent_last=np.ones(P, np.float32), req_prompt=np.repeat(np.arange(P, dtype=np.int32), K),
                 req_sample=np.tile(np.arange(K, dtype=np.int32), P), length=length, capped=capped,
                 dec_req=np.array(dec_req, np.int32), dec_step=np.array(dec_step, np.int32),
                 dec_vec=rng.normal(size=(len(dec_req), d)).astype(np.float16), meta=np.array(json.dumps(meta)))
    return root


def test_load_and_request_rows(tmp_path):
    tr = load(str(_fake_collection(tmp_path / "c")))
    assert tr.hidden_size == 16 and len(tr.key) == 60 and len(tr.length) == 180
    sp = split_by_prompt(tr.key)
    rows = request_rows(tr, sp["test"])
    assert set(tr.req_prompt[rows]) == set(sp["test"].tolist())  # all K samples of a test prompt, nothing else
    assert len(tr.data_hash) == 16 and tr.data_hash == load(str(tmp_path / "c")).data_hash


def test_train_and_eval_cli(tmp_path):
    from lenpred.sidecar.heads import load_head
    from lenpred.train import evaluate, train

    data = _fake_collection(tmp_path / "c")
    heads = tmp_path / "heads"
    rc = train.main(["--data", str(data), "--out", str(heads), "--report", str(tmp_path / "rep"), "--epochs", "3",
                     "--plp-epochs", "2", "--skip", "proxy-minilm"])
    assert rc == 0
    egtp = load_head(heads / "egtp.safetensors")
    plp = load_head(heads / "plp.safetensors")
    assert egtp.meta.input_dim == 16 and plp.meta.input_dim == 32 and plp.meta.kind == "plp"
    assert egtp.meta.data_hash and "lenpred train" in egtp.meta.trained["command"]
    assert egtp.meta.calibration["p90_scale"] > 0 and "mae" in egtp.meta.metrics
    split = json.loads((tmp_path / "rep" / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    assert (heads / "baselines" / "last-token-mlp.safetensors").exists()
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {"egtp", "const-median", "prompt-length", "last-token-mlp", "mean-pool-head"} <= set(rep["methods"])
    assert set(rep["plp"]["mae_by_tokens"]) >= {"0", "8"}
    rc = evaluate.main(["--data", str(data), "--heads", str(heads), "--out", str(tmp_path / "ev"), "--no-timing"])
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["evaluated_on"].startswith("test split") and ev["n_requests"] == rep["n_requests"]
    md = (tmp_path / "ev" / "report.md").read_text()
    assert sum(line.startswith("| egtp |") for line in md.splitlines()) == 1

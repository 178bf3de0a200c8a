"""End to end on real parts: a real SGLang 0.5.23 server on CPU (lenpred's dev launcher) with the tap
loaded through its entry point, the real `lenpred sidecar` subprocess, a real Redis.

The tap's stream passes through a recording gRPC proxy (real gRPC on both hops) so the pooled
vectors SGLang produced can be compared with an offline transformers computation over the same
tokens. One server for the whole module; requests are short (max_new_tokens <= 12) for CPU time.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import redis
import torch

pytest.importorskip("sglang")

from lenpred.contract import keys  # noqa: E402
from lenpred.model import MODEL_ID, hf_checkpoint  # noqa: E402
from lenpred.harness.redisproc import free_port  # noqa: E402
from lenpred.tap.config import TapConfig  # noqa: E402
from lenpred.tap.pooling import pool_direct, token_entropy  # noqa: E402
from lenpred.harness.recorder import RecordingSidecar  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow]
torch.set_num_threads(1)
CHUNK = 64
EVERY = 4


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    from lenpred.bench._thread import write_random_heads
    from lenpred.harness.engine import start_engine

    tmp = tmp_path_factory.mktemp("e2e")
    heads = write_random_heads(tmp / "heads", 576, MODEL_ID)
    sc_port = free_port()
    sc_log = open(tmp / "sidecar.log", "wb")
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "lenpred.cli", "sidecar", "--port", str(sc_port), "--redis-url",
         redis_server.url, "--device", "cpu", "--heads", str(heads), "--max-wait-us", "500"],
        stdout=sc_log, stderr=subprocess.STDOUT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    proxy = eng = None
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{sc_port}")
        grpc.channel_ready_future(ch).result(timeout=60)
        ch.close()
        proxy = RecordingSidecar(forward_to=f"127.0.0.1:{sc_port}")
        eng = start_engine(free_port(), proxy.target, log_path=tmp / "sglang.log",
                           extra_args=["--chunked-prefill-size", str(CHUNK)],
                           env={"LENPRED_TAP_EVERY": str(EVERY), "LENPRED_TAP_LOG_EVERY_S": "5"})
        yield type("Stack", (), {"eng": eng, "proxy": proxy, "redis_url": redis_server.url,
                                 "log": tmp / "sglang.log", "sidecar_log": tmp / "sidecar.log"})
    finally:
        if eng is not None:
            eng.stop()
        if proxy is not None:
            proxy.stop()
        sidecar.terminate()
        try:
            sidecar.wait(10)
        except subprocess.TimeoutExpired:
            sidecar.kill()
        sc_log.close()


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = hf_checkpoint()
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def generate(url: str, rid: str, ids: list[int], max_new: int = 8, **extra) -> dict:
    body = {"rid": rid, "input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0},
            **extra}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


SLICE = TapConfig().entropy_vocab  # the tap's default vocabulary slice for the pool's entropies
BLOCK = TapConfig().prefix_block


def offline(model, ids: list[int]):
    """Final-layer rows and the entropies the tap uses (renormalised over the vocabulary slice)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[-1][0]
    return h, token_entropy(out.logits[0, :, :SLICE])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def wait_pred(r: redis.Redis, rid: str, timeout: float = 20.0, finished: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    h = {}
    while time.monotonic() < deadline:
        h = {k.decode(): v.decode() for k, v in r.hgetall(keys.pred_key(keys.DEFAULT_NAMESPACE, rid)).items()}
        if h and (not finished or int(h.get("true_len", -1)) >= 0):
            return h
        time.sleep(0.1)
    raise AssertionError(f"no {'finished ' if finished else ''}prediction in Redis for {rid}: {h}")


def test_predictions_in_redis_and_vectors_match_offline(stack, hf):
    model, tok = hf
    url, proxy = stack.eng.url, stack.proxy
    r = redis.Redis.from_url(stack.redis_url)
    short = chat_ids(tok, "What is the capital of France? Answer in one sentence.")
    long_text = ("Summarise the following notes for a project meeting. " +
                 " ".join(f"Item {i}: the team reviewed module {i} and agreed on next steps." for i in range(12)))
    long = chat_ids(tok, long_text)
    assert len(long) > 2 * CHUNK, len(long)  # split over >= 3 chunked-prefill batches

    out = {}
    out["e2e-short"] = generate(url, "e2e-short", short, 12)
    out["e2e-short-again"] = generate(url, "e2e-short-again", short, 12)  # prefix in the radix cache
    out["e2e-long"] = generate(url, "e2e-long", long, 8)
    out["e2e-logprob"] = generate(url, "e2e-logprob", chat_ids(tok, "Name a colour."), 9, return_logprob=True)

    # the radix cache really served the repeated prompt
    assert out["e2e-short-again"]["meta_info"]["cached_tokens"] >= len(short) - 1
    assert out["e2e-short"]["meta_info"]["cached_tokens"] < len(short) - 1

    # predictions in Redis for every rid; true lengths recorded once finished
    for rid, o in out.items():
        h = wait_pred(r, rid, finished=True)
        assert int(h["true_len"]) == o["meta_info"]["completion_tokens"], (rid, h)
        assert int(h["prompt_tokens"]) == o["meta_info"]["prompt_tokens"], (rid, h)
        assert float(h["p90"]) >= float(h["p50"]) > 0

    # pooled vectors from SGLang (bf16 engine) vs transformers (fp32) over the same tokens
    assert proxy.wait_for(lambda p: all(rid in p.prefill() for rid in out))
    pre = proxy.prefill()
    pre_last = proxy.prefill_last()
    # a radix-cache hit (the repeated prompt; the chat template's shared system prompt) is restored
    # from the tap's prefix store in whole blocks; the rest of the cached prefix (< one block) is
    # left out of the pool: the pool covers [0, whole) and the computed rows [cached, len)
    assert out["e2e-short-again"]["meta_info"]["cached_tokens"] >= BLOCK
    for rid, ids in (("e2e-short", short), ("e2e-short-again", short), ("e2e-long", long)):
        cached = out[rid]["meta_info"]["cached_tokens"]
        whole = cached // BLOCK * BLOCK
        rows = torch.cat([torch.arange(whole), torch.arange(cached, len(ids))])
        vec, ntok, ent_mean = pre[rid]
        assert ntok == len(ids)
        h, ent = offline(model, ids)
        h, ent = h[rows], ent[rows]
        egtp, mean, last = pool_direct(h, ent), h.mean(0), h[-1]
        e = rel_err(vec, egtp)
        assert e < 0.03, (rid, e)  # bf16 engine vs fp32 offline
        # and it is the entropy-weighted pool, not some other pooling of the same rows
        assert e < rel_err(vec, mean) / 3 and e < rel_err(vec, last) / 3, rid
        assert abs(ent_mean - float(ent.mean())) < 0.05 * float(ent.mean()) + 0.02, (rid, ent_mean)
        assert rel_err(pre_last[rid], last) < 0.03, rid  # the last-token head's input

    # decode vectors every k tokens: the state at step s is the row that predicts token s+1
    dec = proxy.decode()
    n_short = out["e2e-short"]["meta_info"]["completion_tokens"]
    steps = [s for s, _ in dec["e2e-short"]]  # every k-th engine step: phase set by the engine
    assert steps and all(0 < s < n_short for s in steps)
    assert all(b - a == EVERY for a, b in zip(steps, steps[1:])) and len(steps) >= (n_short - 1) // EVERY
    lp = out["e2e-logprob"]["meta_info"]["output_token_logprobs"]
    gen_ids = [t[1] for t in lp]
    ids = chat_ids(tok, "Name a colour.")
    for step, v in dec["e2e-logprob"]:
        h, _ = offline(model, ids + gen_ids[:step])
        assert rel_err(v, h[len(ids) + step - 1]) < 0.03, step

    # finished events carry the true length and whether max_new_tokens cut it
    fin = proxy.finished()
    for rid, o in out.items():
        m = o["meta_info"]
        assert fin[rid].output_tokens == m["completion_tokens"], rid
        assert fin[rid].truncated == (m["finish_reason"]["type"] == "length"), (rid, m["finish_reason"])
        assert not fin[rid].aborted


def test_tap_cost_is_logged_and_no_errors(stack):
    # the scheduler logs its cost line every LENPRED_TAP_LOG_EVERY_S once steps ran
    generate(stack.eng.url, "e2e-cost", list(range(100, 180)), 8)
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        lines = [x for x in stack.log.read_text().splitlines() if "lenpred tap stats" in x]
        if lines:
            line = lines[-1]
            break
        generate(stack.eng.url, f"e2e-cost-{time.monotonic()}", list(range(100, 110)), 2)
        time.sleep(1)
    assert line, "no tap stats line in the server log"
    print(line)
    assert "errors=0" in line
    assert "lenpred tap: error" not in stack.log.read_text()


def test_whole_spine_through_the_router(stack, tmp_path):
    """Issue 2's walking skeleton: client -> router (HTTP) -> real SGLang with the tap -> sidecar
    (gRPC) -> Redis -> router. The chat request comes back; its prediction sits in Redis under the
    rid the router assigned, is visible through the router's debug endpoint, and the engine's true
    length is recorded once it finishes."""
    import httpx

    from lenpred.harness.procs import lenpred_argv, spawn, wait_http

    port = free_port()
    router = spawn("router", lenpred_argv("router", "serve", "--host", "127.0.0.1", "--port", str(port),
                                          "--backends", stack.eng.url, "--redis-url", stack.redis_url),
                   tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(router, base + "/ready", 60)
        resp = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "model": "default", "max_tokens": 10, "temperature": 0,
            "messages": [{"role": "user", "content": "Name three colours of the rainbow."}]})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["message"]["content"]
        rid = resp.headers["x-lenpred-rid"]
        n_out = body["usage"]["completion_tokens"]
        r = redis.Redis.from_url(stack.redis_url)
        rec = wait_pred(r, rid, finished=True)
        assert rec["rid"] == rid and float(rec["p50"]) > 0 and float(rec["p90"]) >= float(rec["p50"])
        assert int(rec["true_len"]) == n_out
        assert "x-lenpred-prediction" in resp.headers
        view = httpx.get(f"{base}/v1/lenpred/requests/{rid}", timeout=10).json()
        assert view["rid"] == rid and view["prediction"]["rid"] == rid
        assert view["prediction"]["source"] in ("egtp", "plp") and view["prediction"]["true_len"] == n_out
    finally:
        router.stop()

"""The SGLang emulator: API shapes of SGLang 0.5.23 and the batching/KV/priority behaviour."""
from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest

from lenpred.harness.emulator import start_in_thread

# sglang/srt/managers/load_snapshot.py (0.5.23): LoadSnapshot's flat "core" fields.
SGLANG_CORE_KEYS = {
    "timestamp", "dp_rank", "num_running_reqs", "num_waiting_reqs", "num_waiting_uncached_tokens",
    "num_used_tokens", "num_total_tokens", "num_active_tokens", "num_prealloc_ready_tokens",
    "max_total_num_tokens", "max_running_requests", "token_usage", "gen_throughput", "cache_hit_rate",
    "utilization", "total_prefill_uncached_tokens", "total_prefill_busy_us", "decode_moments",
}


@pytest.fixture()
def emulator():
    started = []

    def start(**cfg):
        started.append(start_in_thread(**cfg))
        return started[-1]

    yield start
    for e in started:
        e.stop()


_prompts = itertools.count()


def gen(n_out: int, prompt_tokens: int = 10, ids: list[int] | None = None, **extra) -> dict:
    """A /generate body; each call gets its own prompt (no prefix-cache hits) unless `ids` is given."""
    base = next(_prompts) * 100_000
    return {"input_ids": ids if ids is not None else list(range(base, base + prompt_tokens)),
            "sampling_params": {"max_new_tokens": 1000}, "custom_params": {"emulated_output_len": n_out}, **extra}


def test_loads_server_info_models_health(emulator):
    e = emulator(max_total_num_tokens=5000)
    loads = httpx.get(f"{e.url}/v1/loads").json()
    assert {"timestamp", "version", "accelerator", "num_accelerators", "loads"} <= set(loads)
    assert set(loads["loads"][0]) == SGLANG_CORE_KEYS and loads["loads"][0]["max_total_num_tokens"] == 5000
    assert httpx.get(f"{e.url}/server_info").json()["max_total_num_tokens"] == 5000
    assert httpx.get(f"{e.url}/v1/models").json()["data"][0]["id"] == "emulated-model"
    assert httpx.get(f"{e.url}/health").status_code == 200
    httpx.post(f"{e.url}/emulator/health", json={"healthy": False})
    assert httpx.get(f"{e.url}/health").status_code == 503


def test_output_length_and_finish_reasons(emulator):
    e = emulator()
    r = httpx.post(f"{e.url}/generate", json=gen(5, rid="abc")).json()
    assert r["meta_info"]["id"] == "abc" and r["meta_info"]["completion_tokens"] == 5
    assert r["meta_info"]["finish_reason"]["type"] == "stop"
    capped = httpx.post(f"{e.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                         "custom_params": {"emulated_output_len": 50}}).json()
    assert capped["usage"]["completion_tokens"] == 3 and capped["choices"][0]["finish_reason"] == "length"


def test_streams_are_openai_sse(emulator):
    e = emulator()
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True},
            "custom_params": {"emulated_output_len": 3}}
    with httpx.stream("POST", f"{e.url}/v1/chat/completions", json=body) as s:
        events = [line[6:] for line in s.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(x) for x in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    with httpx.stream("POST", f"{e.url}/generate", json=gen(2, stream=True)) as s:
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["text"] == " t1 t2"


async def test_kv_capacity_queues_and_priority_orders(emulator):
    e = emulator(max_total_num_tokens=700, enable_priority=True, step_base_s=0.002)
    async with httpx.AsyncClient(base_url=e.url, timeout=30) as c:
        blocker = asyncio.create_task(c.post("/generate", json=gen(40, 500)))
        await asyncio.sleep(0.03)
        low = asyncio.create_task(c.post("/generate", json=gen(5, 500, rid="low", priority=1)))
        await asyncio.sleep(0.01)
        high = asyncio.create_task(c.post("/generate", json=gen(5, 500, rid="high", priority=9)))
        await asyncio.sleep(0.01)
        load = (await c.get("/v1/loads")).json()["loads"][0]
        assert load["num_running_reqs"] == 1 and load["num_waiting_reqs"] == 2
        await asyncio.gather(blocker, low, high)
        finished = [f["rid"] for f in (await c.get("/emulator/requests")).json()["finished"]]
    assert finished[1:] == ["high", "low"]  # higher priority first (SGLang's default direction)


async def test_decode_growth_retracts_and_requests_still_finish(emulator):
    e = emulator(max_total_num_tokens=300, step_base_s=0.001)
    async with httpx.AsyncClient(base_url=e.url, timeout=30) as c:
        outs = await asyncio.gather(*(c.post("/generate", json=gen(120, 20)) for _ in range(3)))
        state = (await c.get("/emulator/requests")).json()
    assert all(o.json()["meta_info"]["completion_tokens"] == 120 for o in outs)
    assert state["retractions"] >= 1


async def test_abort_ends_the_stream(emulator):
    e = emulator(step_base_s=0.01)
    async with httpx.AsyncClient(base_url=e.url, timeout=30) as c:
        async with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 500, "stream": True,
                                                             "rid": "victim",
                                                             "custom_params": {"emulated_output_len": 500}}) as s:
            lines = s.aiter_lines()
            await lines.__anext__()
            assert (await c.post("/abort_request", json={"rid": "victim"})).status_code == 200
            rest = [line async for line in lines if line]
        loads = (await c.get("/v1/loads")).json()["loads"][0]
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort" and rest[-1] == "data: [DONE]"
    assert loads["num_running_reqs"] == 0 and loads["num_used_tokens"] == 0


def test_prefix_cache_skips_cached_prefill_like_sglangs_radix_cache(emulator):
    # 2 ms per prefill token: a cold 400-token prompt costs ~0.8 s of prefill, a cached one ~1 step
    e = emulator(step_base_s=0.001, step_per_token_s=0.002, prefix_page_tokens=16)
    prompt = list(range(1000, 1400))

    def run(ids: list[int], rid: str) -> dict:
        meta = httpx.post(f"{e.url}/generate", json=gen(1, ids=ids, rid=rid), timeout=30).json()["meta_info"]
        return {"cached": meta["cached_tokens"], "ttft": meta["emulated_timing"]["ttft_s"]}

    cold = run(prompt, "cold")
    warm = run(prompt, "warm")                        # the probe-then-dispatch case: same prompt again
    half = run(prompt[:200] + list(range(5000, 5200)), "half")   # shares 200 tokens = 12 full pages
    other = run(list(range(9000, 9400)), "other")
    assert cold["cached"] == 0 and other["cached"] == 0
    assert warm["cached"] == 399                      # all but the last token, which SGLang recomputes
    assert half["cached"] == 192
    assert warm["ttft"] < cold["ttft"] / 10 and other["ttft"] > cold["ttft"] / 2
    loads = httpx.get(f"{e.url}/v1/loads").json()["loads"][0]
    assert loads["cache_hit_rate"] == round((399 + 192) / 1600, 4)
    assert loads["num_used_tokens"] == 0             # ended requests hold nothing; their pages are evictable


async def test_prefix_cache_evicts_under_kv_pressure_and_off_switch(emulator):
    e = emulator(max_total_num_tokens=600, step_base_s=0.001, prefix_page_tokens=16)
    async with httpx.AsyncClient(base_url=e.url, timeout=30) as c:
        first = list(range(400))
        await c.post("/generate", json=gen(1, ids=first))
        # a different 500-token prompt needs the room: the first prompt's pages are evicted
        await c.post("/generate", json=gen(1, ids=list(range(10_000, 10_500))))
        again = (await c.post("/generate", json=gen(1, ids=first))).json()["meta_info"]["cached_tokens"]
    assert again < 400 - 16
    off = emulator(prefix_cache=False, step_base_s=0.001)
    hits = [httpx.post(f"{off.url}/generate", json=gen(1, ids=first)).json()["meta_info"]["cached_tokens"]
            for _ in range(2)]
    assert hits == [0, 0]


def test_bad_prefix_page_size_is_refused_clearly(capsys):
    from lenpred.harness.emulator import EmulatorConfig, main

    with pytest.raises(ValueError, match="prefix_page_tokens must be >= 1"):
        EmulatorConfig(prefix_page_tokens=0)
    with pytest.raises(SystemExit) as e:
        main(["--prefix-page-tokens", "0"])
    assert e.value.code == 2 and "prefix_page_tokens must be >= 1" in capsys.readouterr().err

"""The parts of `lenpred bench schedule-real` that need no engine: the emulator calibration from
real engines' load samples (`lenpred bench crosscheck --real`), the per-run numbers, the workload."""
from __future__ import annotations

import math
import random

import pytest

from lenpred.bench.crosscheck import fit_cost
from lenpred.bench.real import summary
from lenpred.bench.real.replay import Result
from lenpred.bench.real.workload import distinct_prompts
from lenpred.harness.inject import Item


def samples(a: float, b: float, c: float, prefill_us_per_token: float, seed: int = 0) -> list[dict]:
    """What SGLang's /v1/loads reports every 0.5 s for one replica whose decode steps cost
    a + b x batch + c x KV (cumulative decode moments, cumulative prefill busy time)."""
    rng = random.Random(seed)
    m, busy, toks, out = [0.0] * 6, 0, 0, []
    used = [8000 + 7000 * math.sin(i / 7) for i in range(200)]
    for i in range(200):
        # the fit takes a window's KV as the mean of its two samples: make that the truth here
        batch, kv = rng.randint(1, 64), (used[i - 1] + used[i]) / 2 if i else used[0]
        step_us = 1e6 * (a + b * batch + c * kv)
        n = rng.randint(5, 40)
        m = [m[0] + n, m[1] + n * batch, m[2] + n * step_us, m[3] + n * batch * batch, m[4] + n * batch * step_us,
             m[5] + n * batch]
        new = rng.randint(0, 3000)
        toks, busy = toks + new, busy + new * prefill_us_per_token
        out.append({"t": 0.5 * i, "replica": 0, "decode_moments": list(m), "num_used_tokens": used[i],
                    "total_prefill_busy_us": busy, "total_prefill_uncached_tokens": toks})
    return out


@pytest.mark.parametrize("a,b,c,p", [(0.006, 25e-6, 0.15e-6, 30.0), (0.02, 0.0, 0.0, 5.0), (0.157, 0.0041, 0.0, 900.0)])
def test_fit_cost_recovers_the_step_model(a, b, c, p):
    raw = {"runs": {"x": {"loads": samples(a, b, c, p)}}}
    fit = fit_cost(raw)
    assert fit["step_base_s"] == pytest.approx(a, rel=1e-3, abs=1e-6)
    assert fit["step_per_token_s"] == pytest.approx(b, rel=1e-3, abs=1e-8)
    assert fit["step_per_kv_token_s"] == pytest.approx(c, rel=1e-3, abs=1e-10)
    assert fit["step_per_prefill_token_s"] == pytest.approx(p / 1e6, rel=1e-6)


@pytest.mark.parametrize("b,c", [(-2e-4, 0.0), (0.0, -1e-6), (-2e-4, -1e-6)])
def test_fit_cost_never_hands_the_emulator_a_negative_cost(b, c):
    """Step times that shrink with the batch or the KV (replicas sharing one GPU: a replica's step
    is set by its neighbours) give no negative slope: the term is dropped."""
    fit = fit_cost({"runs": {"x": {"loads": samples(0.03, b, c, 10.0)}}})
    assert fit["step_base_s"] > 0 and fit["step_per_token_s"] >= 0 and fit["step_per_kv_token_s"] >= 0


def test_fit_cost_needs_decode_windows():
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_cost({"runs": {"x": {"loads": [{"t": 0, "replica": 0, "decode_moments": None}]}}})


def R(i, ttft, tpot, status=200, measured=True, tokens=10, expected=10, error=""):
    return Result(index=i, sent=0.0, done=1.0 if status else None, status=status, tokens=tokens, expected=expected,
                  ttft=ttft, tpot=tpot, e2e=1.0, measured=measured, error=error)


@pytest.mark.parametrize("results,slo,goodput,attained", [
    ([R(0, 0.5, 0.02), R(1, 0.5, 0.04), R(2, 3.0, 0.02)], {"ttft_s": 2, "tpot_ms": 30}, 0.1, 1 / 3),
    ([R(0, 0.5, 0.02), R(1, 0.5, 0.02, measured=False)], {"ttft_s": 2, "tpot_ms": 30}, 0.1, 1.0),
    ([R(0, 0.5, 0.02), R(1, None, None, status=0, error="cut off")], {"ttft_s": 2, "tpot_ms": 30}, 0.1, 0.5),
])
def test_online_goodput(results, slo, goodput, attained):
    row = summary.online(results, 10.0, slo)
    assert row["goodput_rps"] == pytest.approx(goodput) and row["slo_attainment"] == pytest.approx(attained)
    assert row["requests"] == sum(r.measured for r in results)
    assert row["cut_off"] == sum(r.error == "cut off" for r in results)


def test_batch_steady_rate_ignores_the_tail():
    res = [Result(index=i, sent=0.0, done=1.0 + i, status=200, tokens=5, expected=5, e2e=1.0 + i) for i in range(20)]
    res.append(Result(index=20, sent=0.0, done=100.0, status=200, tokens=5, expected=5, e2e=100.0))
    row = summary.batch(res)
    assert row["makespan_s"] == 100.0 and row["completed"] == 21
    assert row["steady_rps"] == pytest.approx(0.8 * 21 / (19.0 - 3.0))


@pytest.mark.parametrize("prompts,expected", [
    ([5, 5, 5], [5, 6, 7]),
    ([9, 3, 3, 4], [9, 3, 4, 5]),
    ([10, 1, 10, 2], [10, 1, 11, 2]),
    ([7], [7]),
])
def test_distinct_prompts_raise_as_little_as_possible(prompts, expected):
    items = [Item(f"i{k}", k, p, 100 + k, 2048 + k) for k, p in enumerate(prompts)]
    out = distinct_prompts(items)
    assert [i.prompt_tokens for i in out] == expected
    assert [(i.id, i.index, i.output_tokens, i.cap) for i in out] == [(i.id, i.index, i.output_tokens, i.cap) for i in items]

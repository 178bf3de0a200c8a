"""The SGLang tap plugin against real SGLang 0.5.23 classes (no GPU, no mocks of SGLang or gRPC).

- the entry point is discovered and executed by SGLang's own `load_plugins()` (fresh process), and
  its hooks wrap the real `TpModelWorker.forward_batch_generation` / `Scheduler.process_batch_result`;
- the adapter is driven with real `Req` / `ScheduleBatch` / `LogitsProcessorOutput` /
  `GenerationBatchResult` objects holding the real model's hidden states (SmolLM2-135M-Instruct via
  transformers), and what reaches a real gRPC server is compared with a direct computation:
  one-shot, chunked prefill, radix-cache hits (full and partial), mixed batches, decode, finished;
- TP rank > 0 sends nothing; a dead sidecar and internal failures never raise into SGLang.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt.plugins.hook_registry")

from sglang.srt.layers.logits_processor import LogitsProcessorOutput  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, Req, ScheduleBatch  # noqa: E402
from sglang.srt.managers.utils import GenerationBatchResult  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from lenpred.model import MODEL_ID, hf_checkpoint  # noqa: E402
from lenpred.harness.redisproc import free_port  # noqa: E402
from lenpred.tap import sglang_plugin as plug  # noqa: E402
from lenpred.tap.config import TapConfig  # noqa: E402
from lenpred.tap.entropy import prompt_entropy  # noqa: E402
from lenpred.tap.pooling import pool_direct, token_entropy  # noqa: E402
from lenpred.harness.recorder import RecordingSidecar  # noqa: E402
from lenpred.tap.sender import TapSender  # noqa: E402

pytestmark = pytest.mark.sglang
torch.set_num_threads(1)


def close(a, b, tol=1e-4):
    """Vectors travel as float32 in these tests (LENPRED_TAP_DTYPE=float32): the maths must agree to
    fp32 rounding."""
    ok = torch.allclose(a, b, rtol=tol, atol=tol)
    assert ok, f"max abs diff {(a - b).abs().max():.3g}"
    return ok


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = hf_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return SimpleNamespace(model=model, tok=tok, path=path)


def reference(hf, ids: list[int]):
    """Direct computation with transformers: final-layer (post-norm) rows, full-vocab entropy."""
    with torch.no_grad():
        out = hf.model(torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[-1][0]
    ent = token_entropy(out.logits[0])
    return h, ent, pool_direct(h, ent)


@pytest.fixture(scope="module")
def prompts(hf):
    text = ("You are a helpful assistant. Explain, step by step and with a small example, how a "
            "hash map resolves collisions, and compare open addressing with chaining.")
    a = hf.tok(text)["input_ids"]
    b = hf.tok("Write a haiku about the sea at night.")["input_ids"]
    c = a[:30] + hf.tok(" Instead, list three sorting algorithms.")["input_ids"]
    return SimpleNamespace(a=a, b=b, c=c)


@pytest.fixture()
def worker(hf):
    runner = SimpleNamespace(model=hf.model, model_config=SimpleNamespace(hidden_size=576))
    return SimpleNamespace(model_runner=runner, is_draft_worker=False,
                           server_args=SimpleNamespace(model_path=str(hf.path), served_model_name=None,
                                                       port=0))


@pytest.fixture()
def recorder():
    rec = RecordingSidecar()
    yield rec
    rec.stop()


def make_tap(worker, target: str, **env) -> plug.SGLangTap:
    # exact entropies (no vocabulary slice) unless a test asks: the tests compare with transformers
    env = {"LENPRED_TAP_ENTROPY_VOCAB": "0", **env}
    cfg = TapConfig.from_env({"LENPRED_SIDECAR": target, "LENPRED_TAP_DTYPE": "float32", **env})
    sender = TapSender(target, engine_id="test", backoff_initial_s=0.05, max_queue=cfg.queue)
    return plug.SGLangTap(worker, cfg, sender=sender)


def req(rid: str, ids: list[int], max_new: int = 16) -> Req:
    return Req(rid, "", list(ids), SamplingParams(max_new_tokens=max_new))


def extend_step(st, hf, parts, last_mode=False):
    """One real EXTEND batch: parts = [(Req, prefix_len, extend_len, full token ids)]. The hidden
    rows are the real model's rows for the computed positions (what SGLang's LogitsProcessor stores
    with --return-hidden-states-mode full), or each request's last computed row (`last` mode)."""
    rows = []
    for r, pre, n, ids in parts:
        h, _, _ = reference(hf, ids[: pre + n])
        rows.append(h[pre + n - 1:pre + n] if last_mode else h[pre:pre + n])
    hidden = torch.cat(rows)
    batch = ScheduleBatch(reqs=[p[0] for p in parts], forward_mode=ForwardMode.EXTEND,
                          extend_lens=[p[2] for p in parts], prefix_lens=[p[1] for p in parts])
    result = GenerationBatchResult(logits_output=LogitsProcessorOutput(
        next_token_logits=torch.zeros(len(parts), 8), hidden_states=hidden))
    # the two hooks, in the order SGLang runs them
    out = plug.around_forward_batch_generation(lambda w, b: result, st_worker(st), batch)
    assert out is result
    assert plug.after_process_batch_result(None, None, batch, result) is None
    return batch, result


def st_worker(st):
    return st._worker


@pytest.fixture()
def tap(worker, recorder, monkeypatch):
    st = make_tap(worker, recorder.target)
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)  # the per-process singleton the hooks use
    yield st
    st.sender.close()


def sent_vec(recorder, rid, timeout=10):
    assert recorder.wait_for(lambda r: rid in r.prefill(), timeout), f"no prefill vector for {rid}"
    return recorder.prefill()[rid]


# ----------------------------------------------------------------------------- discovery
def test_entry_point_loaded_by_sglang_load_plugins():
    """A fresh process, as SGLang's spawned scheduler: load_plugins() finds our entry point and the
    hooks wrap the real targets."""
    code = textwrap.dedent("""
        import sglang.srt.managers.tp_worker as tw, sglang.srt.managers.scheduler as sc
        # kept in a list: HookRegistry re-points module-level names bound to the original
        origs = [tw.TpModelWorker.forward_batch_generation, sc.Scheduler.process_batch_result]
        orig_fwd, orig_res = None, None
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from lenpred.tap import sglang_plugin as p
        f, r = tw.TpModelWorker.forward_batch_generation, sc.Scheduler.process_batch_result
        orig_fwd, orig_res = origs
        assert f is not orig_fwd and f.__wrapped__ is orig_fwd, f
        assert r is not orig_res and r.__wrapped__ is orig_res, r
        assert f.__closure__ and any(c.cell_contents is p.around_forward_batch_generation
                                     for c in f.__closure__ if callable(c.cell_contents)), "not our hook"
        print("HOOKED")
    """)
    env = dict(os.environ, SGLANG_PLUGINS="lenpred_tap", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "HOOKED" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_entry_point_respects_whitelist_and_disable():
    code = textwrap.dedent("""
        import sglang.srt.managers.tp_worker as tw
        from sglang.srt.plugins import load_plugins
        load_plugins()
        f = tw.TpModelWorker.forward_batch_generation
        print("HOOKED" if hasattr(f, "__wrapped__") else "PLAIN")
    """)
    for extra in ({"SGLANG_PLUGINS": "someone_else"}, {"SGLANG_PLUGINS": "lenpred_tap", "LENPRED_TAP_ENABLED": "0"}):
        env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert "PLAIN" in out.stdout, (extra, out.stdout[-1000:], out.stderr[-3000:])


# ----------------------------------------------------------------------------- pooling
def test_model_id_from_converted_checkpoint(tap):
    assert tap.model_id == MODEL_ID
    assert tap.tap.head.hidden_size == 576


def test_entropy_from_lm_head_matches_full_logits(hf, prompts):
    h, ent, _ = reference(hf, prompts.a)
    w, offset, rows = plug.lm_head_of(hf.model)
    assert offset == 0 and rows == w.shape[0] == 49152
    assert torch.allclose(prompt_entropy(h, w), ent, atol=1e-4)
    # chunking (a tiny logits budget: 7 rows per chunk) changes nothing
    assert torch.allclose(prompt_entropy(h, w, budget_bytes=4 * w.shape[0] * 7), ent, atol=1e-4)


def test_vocabulary_slice_entropy_is_the_renormalised_slice(hf, prompts):
    """LENPRED_TAP_ENTROPY_VOCAB=N: the entropy of the distribution renormalised over ids < N."""
    h, _, _ = reference(hf, prompts.a)
    w, _, _ = plug.lm_head_of(hf.model)
    with torch.no_grad():
        direct = token_entropy(hf.model(torch.tensor([prompts.a])).logits[0, :, :4096])
    close(prompt_entropy(h, w, vocab=4096), direct)


@pytest.mark.parametrize("vocab", [0, 20000])
def test_vocab_sharded_entropy_combines_exactly(hf, prompts, vocab):
    """TP > 1: each rank holds a vocabulary shard of lm_head and all-gathers 3 numbers per row.
    Two shards, the second shard's stats standing in for the collective's other rank; with a
    vocabulary slice that ends inside the first shard, the second contributes nothing."""
    h, _, _ = reference(hf, prompts.a)
    w, _, _ = plug.lm_head_of(hf.model)
    cut = w.shape[0] // 2
    wa, wb = w[:cut], w[cut:]
    box = {}

    def keep(x):
        box["x"] = x
        return x

    kw = dict(vocab=vocab, chunk_width=cut)
    prompt_entropy(h, wb, vocab_offset=cut, gather=keep, **kw)  # rank 1's local stats (one chunk)
    ent_tp = prompt_entropy(h, wa, gather=lambda x: torch.cat([x, box["x"]]), **kw)
    close(ent_tp, prompt_entropy(h, w, vocab=vocab))


def test_one_shot_prefill_equals_direct(tap, hf, prompts, recorder):
    _, ent, ref = reference(hf, prompts.a)
    extend_step(tap, hf, [(req("one", prompts.a), 0, len(prompts.a), prompts.a)])
    vec, ntok, ent_mean = sent_vec(recorder, "one")
    assert ntok == len(prompts.a)
    close(vec, ref)
    assert abs(ent_mean - float(ent.mean())) < 1e-3


def test_chunked_prefill_equals_direct(tap, hf, prompts, recorder):
    _, _, ref = reference(hf, prompts.a)
    r, L = req("chunked", prompts.a), len(prompts.a)
    cuts = [0, 11, 29, L]
    for s, e in zip(cuts, cuts[1:]):
        extend_step(tap, hf, [(r, s, e - s, prompts.a)])
        if e < L:
            assert "chunked" not in recorder.prefill()
    vec, ntok, _ = sent_vec(recorder, "chunked")
    assert ntok == L
    close(vec, ref)


def test_prefix_cache_hits_are_restored_from_whole_blocks(worker, hf, prompts, recorder, monkeypatch):
    """A radix-cache hit restores the cached prefix's whole blocks from the PrefixStore; the rest of
    the prefix (< one block) is left out of the pool and counted, never counted twice."""
    st = make_tap(worker, recorder.target, LENPRED_TAP_PREFIX_BLOCK="8")
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)
    h_a, e_a, ref_a = reference(hf, prompts.a)
    h_c, e_c, _ = reference(hf, prompts.c)
    L = len(prompts.a)
    # first prompt in two chunks (a block straddles the cut at 13: pieces of one block are merged)
    ra = req("first", prompts.a)
    extend_step(st, hf, [(ra, 0, 13, prompts.a)])
    extend_step(st, hf, [(ra, 13, L - 13, prompts.a)])
    close(sent_vec(recorder, "first")[0], ref_a)
    # the same prompt again: the radix cache serves all but the last token
    extend_step(st, hf, [(req("again", prompts.a), L - 1, 1, prompts.a)])
    # a prompt sharing only the first 30 tokens: blocks 0..2 (24 tokens) restored, 6 left out
    extend_step(st, hf, [(req("shared", prompts.c), 30, len(prompts.c) - 30, prompts.c)])
    whole = (L - 1) // 8 * 8
    keep_a = torch.cat([torch.arange(whole), torch.arange(L - 1, L)])
    close(sent_vec(recorder, "again")[0], pool_direct(h_a[keep_a], e_a[keep_a]))
    keep_c = torch.cat([torch.arange(24), torch.arange(30, len(prompts.c))])
    close(sent_vec(recorder, "shared")[0], pool_direct(h_c[keep_c], e_c[keep_c]))
    assert st.tap.stats.restored_prefix_tokens == whole + 24
    assert st.tap.stats.unpooled_tokens == (L - 1 - whole) + 6
    st.sender.close()


def test_prefix_store_is_off_without_a_radix_cache(worker, recorder):
    worker.server_args.disable_radix_cache = True
    st = make_tap(worker, recorder.target)
    assert not st.tap.prefix.enabled
    st.sender.close()


def test_prefix_not_in_store_is_left_out_not_double_counted(worker, hf, prompts, recorder, monkeypatch):
    st = make_tap(worker, recorder.target, LENPRED_TAP_PREFIX_TOKENS="0")
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)
    h, ent, _ = reference(hf, prompts.a)
    L = len(prompts.a)
    extend_step(st, hf, [(req("nostore", prompts.a), 20, L - 20, prompts.a)])
    vec = sent_vec(recorder, "nostore")[0]
    close(vec, pool_direct(h[20:], ent[20:]))
    assert st.tap.stats.unpooled_tokens == 20
    st.sender.close()


def test_batched_extend_mixed_lengths_and_chunks(tap, hf, prompts, recorder):
    _, _, ref_a = reference(hf, prompts.a)
    _, _, ref_b = reference(hf, prompts.b)
    ra, rb = req("ba", prompts.a), req("bb", prompts.b)
    # step 1: b whole + first chunk of a; step 2: rest of a
    extend_step(tap, hf, [(rb, 0, len(prompts.b), prompts.b), (ra, 0, 17, prompts.a)])
    extend_step(tap, hf, [(ra, 17, len(prompts.a) - 17, prompts.a)])
    close(sent_vec(recorder, "bb")[0], ref_b)
    close(sent_vec(recorder, "ba")[0], ref_a)


def test_decode_every_k_and_finished(worker, hf, prompts, recorder, monkeypatch):
    """Every k-th decode step of the engine ships every running request's row (one copy), with
    each request's own decoded-token count."""
    st = make_tap(worker, recorder.target, LENPRED_TAP_EVERY="2")
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)
    ra, rb = req("da", prompts.a, max_new=3), req("db", prompts.b)
    extend_step(st, hf, [(ra, 0, len(prompts.a), prompts.a), (rb, 0, len(prompts.b), prompts.b)])
    hidden = torch.randn(2, 576)
    for step in (1, 2, 3):
        # SGLang's prepare_for_decode has already counted the input token in seq_lens
        seq = torch.tensor([len(prompts.a) + step, len(prompts.b) + step])
        batch = ScheduleBatch(reqs=[ra, rb], forward_mode=ForwardMode.DECODE, seq_lens_cpu=seq)
        result = GenerationBatchResult(logits_output=LogitsProcessorOutput(
            next_token_logits=torch.zeros(2, 8), hidden_states=hidden * step))
        plug.around_forward_batch_generation(lambda w, b: result, worker, batch)
        ra.output_ids = list(range(step))
        rb.output_ids = list(range(step))
        if step == 3:
            ra.finished_reason = FINISH_LENGTH(length=3)
            rb.finished_reason = FINISH_ABORT()
        st.consume(batch, result)
        # overlap scheduling may show a finished request again next step: reported once only
        if step == 3:
            st.consume(batch, GenerationBatchResult())
    assert recorder.wait_for(lambda r: len(r.finished()) == 2)
    dec = recorder.decode()
    assert [s for s, _ in dec["da"]] == [2] and [s for s, _ in dec["db"]] == [2]
    close(dec["da"][0][1], hidden[0] * 2)
    fin = recorder.finished()
    assert fin["da"].output_tokens == 3 and fin["da"].truncated and not fin["da"].aborted
    assert fin["da"].prompt_tokens == len(prompts.a)
    assert fin["db"].aborted and not fin["db"].truncated
    # each request's output cap travels with its finished row and its prefill row
    assert (fin["da"].max_new_tokens, fin["db"].max_new_tokens) == (3, 16)
    caps = {rid: cap for b in recorder.batches for rid, cap in zip(b.prefill.rids, b.prefill.max_new_tokens)}
    assert caps == {"da": 3, "db": 16}
    assert sum(len(b.finished) for b in recorder.batches) == 2
    st.sender.close()


# ----------------------------------------------------------------------------- ranks and failures
def test_tp_rank_above_zero_sends_nothing(worker, hf, prompts, recorder, monkeypatch):
    from sglang.srt.runtime_context import get_parallel

    get_parallel().override_permanently(tp_rank=1)
    try:
        st = plug.SGLangTap(worker, TapConfig.from_env({"LENPRED_SIDECAR": recorder.target}))
        st._worker = worker
        monkeypatch.setattr(plug, "_STATE", st)
        assert st.rank == 1 and st.sender is None and st.tap is None
        batch, result = extend_step(st, hf, [(req("r1", prompts.a), 0, len(prompts.a), prompts.a)])
        assert not hasattr(result, plug._ATTR)
        plug.after_process_batch_result(None, None, batch, result)
    finally:
        get_parallel().clear_stamp()
    # a rank-0 tap on the same server does deliver: the silence above is the rank gate
    st0 = make_tap(worker, recorder.target)
    st0._worker = worker
    monkeypatch.setattr(plug, "_STATE", st0)
    extend_step(st0, hf, [(req("r0", prompts.b), 0, len(prompts.b), prompts.b)])
    sent_vec(recorder, "r0")
    assert "r1" not in recorder.prefill()
    st0.sender.close()


def test_dead_sidecar_never_raises(worker, hf, prompts, monkeypatch):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    st = make_tap(worker, dead, LENPRED_TAP_QUEUE="4")
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)
    for i in range(12):
        extend_step(st, hf, [(req(f"dead{i}", prompts.b), 0, len(prompts.b), prompts.b)])
    s = st.sender.stats
    assert s.sent == 0 and s.dropped > 0 and not s.connected
    assert st.errors == 0
    st.sender.close()


def test_internal_failure_is_counted_not_raised(tap, worker, prompts, caplog):
    r = req("bad", prompts.b)
    # hidden states of the wrong width: the tap's maths fails inside the hook
    batch = ScheduleBatch(reqs=[r], forward_mode=ForwardMode.EXTEND, extend_lens=[len(prompts.b)],
                          prefix_lens=[0])
    result = GenerationBatchResult(logits_output=LogitsProcessorOutput(
        next_token_logits=torch.zeros(1, 8), hidden_states=torch.randn(len(prompts.b), 7)))
    for _ in range(3):
        assert plug.around_forward_batch_generation(lambda w, b: result, worker, batch) is result
        assert plug.after_process_batch_result(None, None, batch, object()) is None
    assert tap.errors == 3
    assert sum("lenpred tap: error" in rec.message for rec in caplog.records) == 1  # logged once


def test_no_hidden_states_warns_once_and_still_reports_finished(tap, worker, prompts, recorder):
    r = req("nohid", prompts.b)
    batch = ScheduleBatch(reqs=[r], forward_mode=ForwardMode.EXTEND, extend_lens=[len(prompts.b)],
                          prefix_lens=[0])
    result = GenerationBatchResult(logits_output=LogitsProcessorOutput(next_token_logits=torch.zeros(1, 8)))
    plug.around_forward_batch_generation(lambda w, b: result, worker, batch)
    r.finished_reason = FINISH_LENGTH(length=1)
    r.output_ids = [5]
    plug.after_process_batch_result(None, None, batch, result)
    assert "no-hidden" in tap._warned and tap.errors == 0
    assert recorder.wait_for(lambda rr: "nohid" in rr.finished())


def test_pool_off_ships_last_token_state_and_skips_entropy(worker, hf, prompts, recorder, monkeypatch):
    """LENPRED_TAP_POOL=0: no entropy pool (and no full-vocabulary entropies) — only the last prompt
    token's state, chunked prefill included."""
    st = make_tap(worker, recorder.target, LENPRED_TAP_POOL="0")
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)
    monkeypatch.setattr(plug, "prompt_entropy", lambda *a, **k: pytest.fail("entropy computed with the pool off"))
    try:
        h, _, _ = reference(hf, prompts.a)
        n = len(prompts.a)
        r = req("nopool", prompts.a)
        extend_step(st, hf, [(r, 0, n // 2, prompts.a)])
        extend_step(st, hf, [(r, n // 2, n - n // 2, prompts.a)])
        assert recorder.wait_for(lambda rec: "nopool" in rec.prefill_last())
        close(recorder.prefill_last()["nopool"], h[-1])
        assert "nopool" not in recorder.prefill()  # no pooled vector was sent
    finally:
        st.sender.close()


def test_pool_off_with_last_mode_hidden_states(worker, hf, prompts, recorder, monkeypatch):
    """`--return-hidden-states-mode last` (one row per request) is enough with the pool off:
    chunked prefill ships the final chunk's row, a batch of several requests ships each one's."""
    st = make_tap(worker, recorder.target, LENPRED_TAP_POOL="0")
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)
    try:
        ha, _, _ = reference(hf, prompts.a)
        hb, _, _ = reference(hf, prompts.b)
        n = len(prompts.a)
        ra, rb = req("la", prompts.a), req("lb", prompts.b)
        extend_step(st, hf, [(ra, 0, n // 2, prompts.a), (rb, 0, len(prompts.b), prompts.b)], last_mode=True)
        extend_step(st, hf, [(ra, n // 2, n - n // 2, prompts.a)], last_mode=True)
        assert recorder.wait_for(lambda rec: {"la", "lb"} <= set(rec.prefill_last()))
        close(recorder.prefill_last()["la"], ha[-1])
        close(recorder.prefill_last()["lb"], hb[-1])
        assert st.errors == 0 and "rows" not in st._warned
    finally:
        st.sender.close()


def test_pool_on_with_last_mode_warns_and_ships_last_token(worker, hf, prompts, recorder, monkeypatch):
    st = make_tap(worker, recorder.target)
    st._worker = worker
    monkeypatch.setattr(plug, "_STATE", st)
    try:
        hb, _, _ = reference(hf, prompts.b)
        extend_step(st, hf, [(req("pl", prompts.b), 0, len(prompts.b), prompts.b)], last_mode=True)
        assert recorder.wait_for(lambda rec: "pl" in rec.prefill_last())
        close(recorder.prefill_last()["pl"], hb[-1])
        assert "pool-last" in st._warned and "pl" not in recorder.prefill()
    finally:
        st.sender.close()

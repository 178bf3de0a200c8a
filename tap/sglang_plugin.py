"""The lenpred tap as an SGLang 0.5.23 general plugin (fork-free).

Installed by `pip install lenpred[sglang]`, which declares the entry point

    [project.entry-points."sglang.srt.plugins"]
    lenpred_tap = "lenpred.tap.sglang_plugin:register"

SGLang's `load_plugins()` (run at the start of every scheduler process — SGLang spawns them, so a
launcher monkeypatch would not reach them) calls `register()`, which registers two hooks through
`sglang.srt.plugins.hook_registry.HookRegistry`:

1. AROUND `TpModelWorker.forward_batch_generation` (device side, every TP rank).
   It receives the real `ScheduleBatch` (reqs -> rid, origin_input_ids; extend_lens, prefix_lens,
   seq_lens_cpu) and returns the `GenerationBatchResult` whose `logits_output.hidden_states` holds the
   final-layer (post-norm) hidden states — when the server runs with `--return-hidden-states-mode
   full` (every computed token; needed for the entropy pool) or `last` (one row per request; enough
   with `LENPRED_TAP_POOL=0`). No request ever asks for hidden states, so SGLang never copies them to
   the host or to JSON. Right after the original returns, still on the forward stream, the hook
   *enqueues* device work and copies and returns at once: it never waits for the device. Every
   host->device index goes through pinned memory with a non-blocking copy (a plain
   `torch.tensor(..., device="cuda")` synchronises the stream, i.e. waits for the forward, which
   destroys SGLang's CPU/GPU overlap); every device->host copy is non-blocking into pinned memory,
   and a CUDA event marks their completion. What is enqueued:
   - decode: on every k-th decode step of the engine (LENPRED_TAP_EVERY), the whole batch's rows,
     cast to the wire dtype, in one copy; which rows are shipped is decided on the host later;
   - prefill, pool off: the last prompt token's row of each request whose prompt completes;
   - prefill, pool on: next-token entropies of the prompt rows over a vocabulary slice (chunked
     `h @ lm_head[:N].T`, tap/entropy.py), the per-request entropy-softmax summaries and, when the
     engine has a radix cache, per-block summaries for the PrefixStore, packed into one tensor each.
   Every tensor kept is fresh (never a view of a CUDA-graph output buffer), so the next graph replay
   cannot overwrite it. Nothing runs inside a captured region: this code is plain eager Python after
   `model_runner.forward()` returned (decode graph replay, prefill graph or eager).
   Why here and not `ModelRunner.sample`: `sample` sees only the ForwardBatch (rids, no prompt token
   ids) and is skipped for prefill-only requests; `forward_batch_generation` sees the ScheduleBatch,
   runs once per forward on the target model (draft workers are skipped), and its result object
   travels with the batch to result processing in both the normal and the overlap event loops.

2. AFTER `Scheduler.process_batch_result` (host side, TP rank 0 only). The scheduler calls it for
   the batch whose forward produced the result — in the overlap loop one step later, after the
   next forward was launched, which is exactly when our copies are complete (the event is waited
   on, normally without blocking). Here the tap's host work runs: `Tap.on_extend_pieces` (running
   pools merged across chunked prefill and radix-cache hits, see tap/core.py) or `Tap.on_prompt_last`
   (pool off), `Tap.on_decode`,
   `Tap.on_finished` for requests the step finished (true output length, truncated = stopped by
   max_new_tokens, aborted), then `Tap.end_step()` hands one IngestBatch to the non-blocking sender.

Never harms the engine: every hook body is wrapped; an exception is counted, logged once with its
traceback (then every 1000th), and the engine's own result is returned untouched. The sender never
blocks (bounded queue, drop and count, reconnect with backoff).

Verified on CPU (real SGLang 0.5.23, tests/test_sglang_plugin.py and tests/test_e2e_sglang.py) and
on one H200 (real SGLang 0.5.23 with CUDA graphs and the overlap scheduler; cost and correctness in
docs/GPU.md and docs/RESULTS.md). Tensor parallelism > 1 (vocab-sharded lm_head: entropy from
all-gathered per-shard log-sum-exp stats, unit-tested with a real 2-process gloo group) has not run
inside SGLang; DP attention is unverified. Speculative decoding: prefill is tapped, decode vectors
are not (TARGET_VERIFY batches are skipped).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import socket
import time

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH

from lenpred.tap.config import TapConfig
from lenpred.tap.core import Tap
from lenpred.tap.entropy import prompt_entropy
from lenpred.tap.pooling import block_pieces, segment_stats, unpack_stats
from lenpred.tap.sender import TapSender

log = logging.getLogger("lenpred.tap.sglang")

FORWARD_TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"
RESULT_TARGET = "sglang.srt.managers.scheduler.Scheduler.process_batch_result"
HEALTH_PREFIX = "HEALTH_CHECK"
_ATTR = "_lenpred_tap"
_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- entry point
def register() -> None:
    """Entry point called by SGLang's `load_plugins()` in every SGLang process."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    try:
        cfg = TapConfig.from_env()
    except Exception as e:  # bad configuration: say so loudly, leave SGLang untouched
        log.error("lenpred tap disabled: invalid configuration: %s", e)
        return
    if not cfg.enabled:
        log.info("lenpred tap disabled (LENPRED_TAP_ENABLED=0)")
        return
    HookRegistry.register(FORWARD_TARGET, around_forward_batch_generation, HookType.AROUND)
    HookRegistry.register(RESULT_TARGET, after_process_batch_result, HookType.AFTER)
    log.info("lenpred tap registered (sidecar %s, decode every %d)", cfg.sidecar, cfg.every)


# --------------------------------------------------------------------------- helpers
def tp_rank() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_rank)
    except Exception:
        return 0


def tp_size() -> int:
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().tp_size)
    except Exception:
        return 1


def resolve_model_id(server_args) -> str:
    """LENPRED_MODEL_ID, else the canonical id of a lenpred-converted checkpoint, else the served
    model name, else the model path."""
    env = os.environ.get("LENPRED_MODEL_ID")
    if env:
        return env
    path = getattr(server_args, "model_path", None) or ""
    try:
        marker = pathlib.Path(path) / "lenpred-converted.json"
        if marker.is_file():
            mid = json.loads(marker.read_text()).get("model_id")
            if mid:
                return mid
    except Exception:
        pass
    return getattr(server_args, "served_model_name", None) or path


def lm_head_of(model) -> tuple[torch.Tensor, int, int]:
    """(rows, first global id, padded shard rows) of this rank's output projection: the local
    vocabulary rows with padding rows excluded, the global token id of its first row (non-zero
    under TP), and the shard's padded size (equal on every rank, so entropy chunks line up)."""
    head = getattr(model, "lm_head", None)
    if head is None:
        raise RuntimeError(f"{type(model).__name__} has no lm_head")
    w = head.weight
    idx = getattr(head, "shard_indices", None)
    if idx is not None:
        return w[: idx.num_org_elements], int(idx.org_vocab_start_index), int(idx.num_org_elements_padded)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    w = w[:vocab] if vocab else w
    return w, 0, int(w.shape[0])


def max_new_tokens(req) -> int:
    """The request's output cap (0 when SGLang has none, e.g. a context-length-only limit)."""
    sp = getattr(req, "sampling_params", None)
    cap = getattr(sp, "max_new_tokens", None)
    return int(cap) if cap else 0


def _logit_transform(model):
    lp = getattr(model, "logits_processor", None)
    scale = getattr(lp, "logit_scale", None) if lp is not None else None
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return scale, cap


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Non-blocking device->host copy (into pinned memory on CUDA); a fresh tensor, never a view."""
    if t.device.type == "cpu":
        return t.clone()
    return t.to("cpu", non_blocking=True)


def _stager(device: torch.device):
    """list[int] -> int64 tensor on `device` without a stream synchronisation: through pinned
    memory and a non-blocking copy on CUDA (the caching host allocator keeps the pinned block alive
    until the copy has run), a plain tensor on the CPU."""
    if device.type != "cuda":
        return lambda values: torch.as_tensor(values, dtype=torch.int64)
    return lambda values: torch.as_tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


class _Pending:
    """What one forward produced for the tap, waiting for result processing."""

    __slots__ = ("event", "ext_rids", "ext_lens", "ext_prefix", "ext_prompt", "ext_tokens", "ext_cap",
                 "stats", "blocks", "block_cuts", "last_rids", "last_prompt", "last_cap", "last_rows",
                 "dec_reqs", "dec_seq", "dec_rows")

    def __init__(self):
        self.event = None
        # pool on: requests with prompt rows in this step
        self.ext_rids: list[str] = []
        self.ext_lens: list[int] = []
        self.ext_prefix: list[int] = []
        self.ext_prompt: list[int] = []
        self.ext_tokens: list | None = None
        self.ext_cap: list[int] = []
        self.stats = None                      # packed per-request summaries (host, fp32)
        self.blocks = None                     # packed per-block summaries (host, fp32)
        self.block_cuts: list[list[tuple[int, int]]] = []
        # pool off: requests whose prompt completed in this step
        self.last_rids: list[str] = []
        self.last_prompt: list[int] = []
        self.last_cap: list[int] = []
        self.last_rows = None
        # decode: the whole batch on a sampled step
        self.dec_reqs: list = []
        self.dec_seq: list[int] = []
        self.dec_rows = None


class SGLangTap:
    """Per-scheduler-process adapter state (one per process, created lazily at the first forward)."""

    def __init__(self, worker, cfg=None, sender=None):
        self.cfg = cfg or TapConfig.from_env()
        self.rank = tp_rank()
        self.tp = tp_size()
        runner = worker.model_runner
        self.model = runner.model
        self.weight, self.vocab_offset, self.shard_rows = lm_head_of(self.model)
        self.logit_scale, self.softcap = _logit_transform(self.model)
        hidden_size = int(getattr(runner.model_config, "hidden_size", 0) or self.weight.shape[1])
        sa = getattr(worker, "server_args", None)
        self.model_id = resolve_model_id(sa)
        port = getattr(sa, "port", "") if sa is not None else ""
        self.engine_id = os.environ.get("LENPRED_ENGINE_ID") or f"{socket.gethostname()}:{port}"
        self.engine_id += f"/tp{self.rank}"
        if sender is None and self.rank == 0:
            sender = TapSender(self.cfg.sidecar, engine_id=self.engine_id, max_queue=self.cfg.queue,
                               tls=self.cfg.tls)
        self.sender = sender if self.rank == 0 else None
        # the PrefixStore restores radix-cache hits: pointless when the engine has no prefix cache
        radix = not bool(getattr(sa, "disable_radix_cache", False))
        self.tap = Tap(self.cfg, model_id=self.model_id, hidden_size=hidden_size,
                       engine_id=self.engine_id, sender=self.sender,
                       prefix_store=radix) if self.rank == 0 else None
        self.wire_dtype = _WIRE_DTYPES[self.cfg.dtype]
        self.errors = 0
        self._warned: set[str] = set()
        self._prefill_sent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._decode_steps = 0
        self._stage = None
        # cost accounting, wall seconds per batch kind ("extend" / "decode"): `forward` = the
        # engine's forward_batch_generation, `tap` = our two hooks. On CPU (synchronous) this is the
        # tap's true share of step time; on GPU it is host launch time only (see docs/TAP.md).
        self.cost = {k: {"forward_s": 0.0, "tap_s": 0.0, "steps": 0} for k in ("extend", "decode")}
        self._last_log = time.monotonic()
        self.log_every_s = float(os.environ.get("LENPRED_TAP_LOG_EVERY_S", "30"))
        self._gather = None
        if self.tp > 1:
            from sglang.srt.distributed import tensor_model_parallel_all_gather

            self._gather = lambda x: tensor_model_parallel_all_gather(x, dim=0)
        if self.cfg.layer != -1:
            self.warn_once("layer", "LENPRED_TAP_LAYER=%d is not supported by the SGLang tap yet; "
                           "using the last layer (-1)", self.cfg.layer)
        log.info("lenpred tap active: model_id=%s hidden=%d tp_rank=%d sends=%s pool=%s every=%d "
                 "entropy_vocab=%d prefix_store=%s", self.model_id, hidden_size, self.rank, self.rank == 0,
                 self.cfg.pool, self.cfg.every, self.cfg.entropy_vocab,
                 bool(self.tap and self.tap.prefix.enabled))

    # -------------------------------------------------------------- bookkeeping
    def warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("lenpred tap: " + msg, *args)

    def failed(self, where: str) -> None:
        self.errors += 1
        if self.tap is not None:
            self.tap.stats.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            log.exception("lenpred tap: error in %s (count %d); the engine is unaffected",
                          where, self.errors)

    @staticmethod
    def _remember(d: collections.OrderedDict, key: str, cap: int = 100_000) -> None:
        d[key] = None
        d.move_to_end(key)
        while len(d) > cap:
            d.popitem(last=False)

    # -------------------------------------------------------------- device side
    @staticmethod
    def kind(batch) -> str | None:
        mode = getattr(batch, "forward_mode", None)
        if mode is None:
            return None
        return "decode" if mode.is_decode() else "extend" if mode.is_extend() else None

    def account(self, batch, forward_s: float, tap_s: float) -> None:
        k = self.kind(batch)
        if k is not None:
            c = self.cost[k]
            c["forward_s"] += forward_s
            c["tap_s"] += tap_s
            c["steps"] += 1 if forward_s else 0

    def cost_summary(self) -> dict:
        out = {}
        for k, c in self.cost.items():
            frac = c["tap_s"] / c["forward_s"] if c["forward_s"] else 0.0
            out[k] = {**c, "tap_fraction": round(frac, 4)}
        return out

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.log_every_s:
            return
        self._last_log = now
        t = self.tap.stats if self.tap is not None else None
        snd = self.sender.stats if self.sender is not None else None
        log.info("lenpred tap stats: cost=%s tap=%s sender=%s errors=%d", json.dumps(self.cost_summary()),
                 t, snd, self.errors)

    def stage(self, values) -> torch.Tensor:
        return self._stage(values)

    def capture(self, batch, result) -> None:
        """Called right after the forward, on every TP rank. Enqueues device work only."""
        lo = getattr(result, "logits_output", None)
        if batch is None or lo is None:
            return
        mode = batch.forward_mode
        is_decode = mode.is_decode()
        if not (is_decode or mode.is_extend()) or mode.is_target_verify() or mode.is_dllm_extend():
            return
        if getattr(mode, "is_split_prefill", None) and mode.is_split_prefill():
            return
        hs = lo.hidden_states
        if hs is None:
            self.warn_once("no-hidden", "no hidden states in the forward output: start SGLang "
                           "with --return-hidden-states-mode full (or last with LENPRED_TAP_POOL=0); "
                           "prefill/decode vectors are not sent, finished events still are")
            return
        if self._stage is None:
            self._stage = _stager(hs.device)
        p = self._capture_decode(batch, hs) if is_decode else self._capture_extend(batch, hs)
        if p is None:
            return
        if hs.device.type == "cuda":
            p.event = torch.cuda.Event()
            p.event.record()
        setattr(result, _ATTR, p)

    def _capture_decode(self, batch, hs) -> _Pending | None:
        """Every k-th decode step: all rows, one copy. No per-request work here."""
        if self.rank != 0:
            return None
        self._decode_steps += 1
        if self._decode_steps % self.cfg.every:
            return None
        seq = getattr(batch, "seq_lens_cpu", None)
        if seq is None:
            self.warn_once("seq", "decode batch without seq_lens_cpu; decode vectors skipped")
            return None
        p = _Pending()
        p.dec_reqs = list(batch.reqs)
        p.dec_seq = seq.tolist()
        p.dec_rows = _to_host(hs[: len(p.dec_reqs)].to(self.wire_dtype))
        return p

    def _capture_extend(self, batch, hs) -> _Pending | None:
        reqs = batch.reqs
        ext = [int(x) for x in batch.extend_lens]
        pre = [int(x) for x in batch.prefix_lens]
        n_rows = sum(ext)
        full = hs.shape[0] >= n_rows          # --return-hidden-states-mode full
        if not full and hs.shape[0] != len(reqs):
            self.warn_once("rows", "hidden states have %d rows for %d extend tokens of %d requests; "
                           "skipped", hs.shape[0], n_rows, len(reqs))
            return None
        # prompt rows of each request: positions [pre, pre+ext) that are < prompt_len
        sel: list[tuple[int, int, int]] = []  # (req index, row offset, prompt rows)
        off = 0
        for i, r in enumerate(reqs):
            n_prompt = max(0, min(ext[i], len(r.origin_input_ids) - pre[i]))
            if n_prompt > 0 and r.rid not in self._prefill_sent and not r.rid.startswith(HEALTH_PREFIX):
                sel.append((i, off, n_prompt))
            off += ext[i]
        if not sel:
            return None
        if self.cfg.pool and not full:
            self.warn_once("pool-last", "LENPRED_TAP_POOL=1 needs --return-hidden-states-mode full; "
                           "with 'last' only the last prompt token's state is shipped")
        p = (self._capture_pool(batch, hs, sel, n_rows) if self.cfg.pool and full
             else self._capture_last(batch, hs, sel, full))
        if p is not None:
            for i, _, n in sel:
                if pre[i] + n >= len(reqs[i].origin_input_ids):
                    # prompt complete: a later re-prefill (retraction) is not re-sent
                    self._remember(self._prefill_sent, reqs[i].rid)
        return p

    def _capture_last(self, batch, hs, sel, full: bool) -> _Pending | None:
        """Pool off: the last prompt token's row of each request whose prompt completes here."""
        if self.rank != 0:
            return None
        reqs, pre, ext = batch.reqs, batch.prefix_lens, batch.extend_lens
        p = _Pending()
        rows = []
        for i, o, n in sel:
            plen = len(reqs[i].origin_input_ids)
            if int(pre[i]) + n < plen:
                continue  # an earlier chunk: nothing to ship yet
            if not full and n != int(ext[i]):
                continue  # 'last' mode row is not a prompt row (re-prefill after retraction)
            rows.append(o + n - 1 if full else i)
            p.last_rids.append(reqs[i].rid)
            p.last_prompt.append(plen)
            p.last_cap.append(max_new_tokens(reqs[i]))
        if not rows:
            return None
        p.last_rows = _to_host(hs.index_select(0, self.stage(rows).to(hs.device)).to(self.wire_dtype))
        return p

    def _capture_pool(self, batch, hs, sel, n_rows: int) -> _Pending | None:
        """Pool on: entropies, per-request summaries and (with a prefix cache) block summaries."""
        reqs, pre = batch.reqs, [int(x) for x in batch.prefix_lens]
        if len(sel) == len(reqs) and all(n == int(batch.extend_lens[i]) for i, _, n in sel):
            h = hs[:n_rows]
        else:
            idx = [j for _, o, n in sel for j in range(o, o + n)]
            h = hs.index_select(0, self.stage(idx).to(hs.device))
        # every TP rank takes part in the entropy's all-gather; only rank 0 goes on
        ent = prompt_entropy(h, self.weight, vocab=self.cfg.entropy_vocab, vocab_offset=self.vocab_offset,
                             chunk_width=self.cfg.entropy_vocab or self.shard_rows,
                             logit_scale=self.logit_scale, softcap=self.softcap, gather=self._gather)
        if self.rank != 0:
            return None
        p = _Pending()
        p.ext_rids = [reqs[i].rid for i, _, _ in sel]
        p.ext_lens = [n for _, _, n in sel]
        p.ext_prefix = [pre[i] for i, _, _ in sel]
        p.ext_prompt = [len(reqs[i].origin_input_ids) for i, _, _ in sel]
        p.ext_cap = [max_new_tokens(reqs[i]) for i, _, _ in sel]
        p.stats = _to_host(segment_stats(h, ent, p.ext_lens, self.cfg.tau, stage=self.stage))
        if self.tap.prefix.enabled:
            p.ext_tokens = [reqs[i].origin_input_ids for i, _, _ in sel]
            p.block_cuts = [block_pieces(pr, n, self.tap.prefix.block) for pr, n in zip(p.ext_prefix, p.ext_lens)]
            flat = [n for cut in p.block_cuts for _, n in cut]
            p.blocks = _to_host(segment_stats(h, ent, flat, self.cfg.tau, stage=self.stage))
        return p

    # -------------------------------------------------------------- host side
    def consume(self, batch, result) -> None:
        """Called after the scheduler processed `result` (TP rank 0)."""
        if self.tap is None:
            return
        t0 = time.perf_counter()
        p: _Pending | None = getattr(result, _ATTR, None) if result is not None else None
        if p is not None:
            try:
                delattr(result, _ATTR)
            except AttributeError:
                pass
            if p.event is not None:
                p.event.synchronize()
            if p.ext_rids:
                blocks = None
                if p.blocks is not None:
                    flat = [n for cut in p.block_cuts for _, n in cut]
                    states = iter(unpack_stats(p.blocks, flat))
                    blocks = [[(j, next(states)) for j, _ in cut] for cut in p.block_cuts]
                self.tap.on_extend_pieces(p.ext_rids, unpack_stats(p.stats, p.ext_lens), p.ext_lens,
                                          p.ext_prompt, p.ext_prefix, p.ext_tokens, blocks=blocks,
                                          max_new_tokens=p.ext_cap)
            if p.last_rids:
                self.tap.on_prompt_last(p.last_rids, p.last_rows, p.last_prompt, p.last_cap)
            if p.dec_reqs:
                self._consume_decode(p)
        if batch is not None:
            for r in batch.reqs:
                if not r.finished() or r.rid in self._finished or r.rid.startswith(HEALTH_PREFIX):
                    continue
                self._remember(self._finished, r.rid)
                self._prefill_sent.pop(r.rid, None)
                reason = r.finished_reason
                self.tap.on_finished(r.rid, output_tokens=len(r.output_ids),
                                     prompt_tokens=len(r.origin_input_ids),
                                     truncated=isinstance(reason, FINISH_LENGTH),
                                     aborted=isinstance(reason, FINISH_ABORT),
                                     max_new_tokens=max_new_tokens(r))
        self.tap.end_step()
        self.account(batch, 0.0, time.perf_counter() - t0)
        self.maybe_log()

    def _consume_decode(self, p: _Pending) -> None:
        # overlap scheduling runs one more decode step for a request whose finish is only seen
        # when the previous step's result is processed: drop rows of finished requests
        keep, rids, steps = [], [], []
        for i, r in enumerate(p.dec_reqs):
            rid = r.rid
            step = p.dec_seq[i] - len(r.origin_input_ids)
            if step > 0 and rid not in self._finished and not rid.startswith(HEALTH_PREFIX):
                keep.append(i)
                rids.append(rid)
                steps.append(step)
        if keep:
            rows = p.dec_rows if len(keep) == len(p.dec_reqs) else p.dec_rows[keep]
            self.tap.on_decode(rids, steps, rows)


_STATE: SGLangTap | None = None
_INIT_FAILED = False


def _state_for(worker) -> SGLangTap | None:
    global _STATE, _INIT_FAILED
    if _STATE is None and not _INIT_FAILED:
        try:
            _STATE = SGLangTap(worker)
        except Exception:
            _INIT_FAILED = True
            log.exception("lenpred tap: initialisation failed; the tap stays off in this process")
    return _STATE


def get_state() -> SGLangTap | None:
    return _STATE


# --------------------------------------------------------------------------- hooks
def around_forward_batch_generation(original, worker, *args, **kwargs):
    t0 = time.perf_counter()
    result = original(worker, *args, **kwargs)
    t1 = time.perf_counter()
    try:
        if getattr(worker, "is_draft_worker", False):
            return result
        batch = args[0] if args else kwargs.get("batch")
        if batch is None:
            return result
        st = _state_for(worker)
        if st is not None:
            try:
                st.capture(batch, result)
            except Exception:
                st.failed("forward hook")
            st.account(batch, t1 - t0, time.perf_counter() - t1)
    except Exception:  # even bookkeeping must never raise into SGLang
        log.debug("lenpred tap: forward hook outer failure", exc_info=True)
    return result


def after_process_batch_result(ret, scheduler, batch, result, *args, **kwargs):
    st = _STATE
    if st is None or st.tap is None:
        return None
    try:
        st.consume(batch, result)
    except Exception:
        st.failed("result hook")
    return None

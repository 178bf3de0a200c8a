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
   final-layer (post-norm) hidden states: every computed token of an EXTEND/MIXED batch and one row
   per request of a DECODE batch — when the server runs with `--return-hidden-states-mode full`
   (server-wide capture mode; no request ever asks for hidden states, so SGLang never copies them
   to the host or to JSON). Right after the original returns, still on the forward stream, the hook
   enqueues: next-token entropy of every prompt row (chunked `h @ lm_head.T`, because SGLang only
   computes logits for the last prompt token), the per-request entropy-weighted segment summaries
   (`pooling.segment_stats`), a copy of the sampled decode rows, and non-blocking device->host
   copies of those small results plus a CUDA event. Nothing is synchronised here, and every tensor
   kept is a fresh tensor (never a view of a CUDA-graph output buffer), so the next graph replay
   cannot overwrite it. Nothing runs inside a captured region: this code is plain eager Python
   after `model_runner.forward()` returned (decode graph replay, prefill graph or eager).
   Why here and not `ModelRunner.sample`: `sample` sees only the ForwardBatch (rids, no prompt token
   ids) and is skipped for prefill-only requests; `forward_batch_generation` sees the ScheduleBatch,
   runs once per forward on the target model (draft workers are skipped), and its result object
   travels with the batch to result processing in both the normal and the overlap event loops.

2. AFTER `Scheduler.process_batch_result` (host side, TP rank 0 only). The scheduler calls it for
   the batch whose forward produced the result — in the overlap loop one step later, after the
   next forward was launched, which is exactly when our copies are complete (the event is waited
   on, normally without blocking). Here the tap's host work runs: `Tap.on_extend_pieces` (running
   pools merged across chunked prefill and radix-cache hits, see tap/core.py), `Tap.on_decode`,
   `Tap.on_finished` for requests the step finished (true output length, truncated = stopped by
   max_new_tokens, aborted), then `Tap.end_step()` hands one IngestBatch to the non-blocking sender.

Never harms the engine: every hook body is wrapped; an exception is counted, logged once with its
traceback (then every 1000th), and the engine's own result is returned untouched. The sender never
blocks (bounded queue, drop and count, reconnect with backoff).

Verified on CPU only (real SGLang 0.5.23, `--device cpu`, torch_native attention, no CUDA graphs,
no overlap scheduling on CPU): tests/test_sglang_plugin.py and tests/test_e2e_sglang.py. The CUDA
paths (graph replay buffers, stream ordering, pinned non-blocking copies + event, overlap loop) are
written for the GPU from reading the 0.5.23 source, but NOT verified on a GPU here. Tensor
parallelism > 1 (vocab-sharded lm_head: entropy from all-gathered per-shard log-sum-exp stats) and
DP attention are likewise unverified. Speculative decoding: prefill is tapped, decode vectors are
not (TARGET_VERIFY batches are skipped).
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

log = logging.getLogger("lenpred.tap.sglang")

FORWARD_TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"
RESULT_TARGET = "sglang.srt.managers.scheduler.Scheduler.process_batch_result"
HEALTH_PREFIX = "HEALTH_CHECK"
_ATTR = "_lenpred_tap"
_LOGITS_BUDGET_BYTES = 64 << 20  # fp32 logits materialised per entropy chunk


# --------------------------------------------------------------------------- entry point
def register() -> None:
    """Entry point called by SGLang's `load_plugins()` in every SGLang process."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from lenpred.tap.config import TapConfig

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


def lm_head_of(model) -> torch.Tensor:
    """The local vocabulary rows of the output projection (padding rows excluded)."""
    head = getattr(model, "lm_head", None)
    if head is None:
        raise RuntimeError(f"{type(model).__name__} has no lm_head")
    w = head.weight
    idx = getattr(head, "shard_indices", None)
    if idx is not None:
        return w[: idx.num_org_elements]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return w[:vocab] if vocab else w


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


def prompt_entropy(hidden: torch.Tensor, weight: torch.Tensor, *, logit_scale=None, softcap=None,
                   gather=None) -> torch.Tensor:
    """Next-token entropy (nats, fp32) of every row of `hidden`, from logits = hidden @ weight.T,
    computed `chunk` rows at a time so the fp32 logits stay within _LOGITS_BUDGET_BYTES.
    Entropy = logsumexp(l) - E_p[l], assembled from per-shard (max, sum e^(l-max),
    sum e^(l-max)*l) so a vocabulary-sharded lm_head only needs those 3 numbers per row gathered
    (`gather`: all-gather along dim 0 over the TP group; None for TP=1)."""
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out
    chunk = max(1, _LOGITS_BUDGET_BYTES // (4 * max(1, weight.shape[0])))
    for s in range(0, n, chunk):
        lg = (hidden[s:s + chunk].to(weight.dtype) @ weight.t()).float()
        if logit_scale is not None:
            lg.mul_(logit_scale)
        if softcap:
            lg = torch.tanh(lg / softcap) * softcap
        m = lg.amax(-1, keepdim=True)
        lg.sub_(m)                      # l - m, in place (one fp32 logits buffer per chunk)
        e = torch.exp(lg)
        z = e.sum(-1)                   # sum e^(l-m)
        t = torch.linalg.vecdot(e, lg)  # sum e^(l-m) * (l-m)
        del lg, e
        if gather is not None:
            # per-shard (m, z, t) -> global: H = log Z - E[l - M], M = max over shards
            parts = gather(torch.stack([m.squeeze(-1), z, t], 0).unsqueeze(0).contiguous())  # [tp,3,rows]
            mm = parts[:, 0].amax(0)
            sc = torch.exp(parts[:, 0] - mm)
            zz = (parts[:, 1] * sc).sum(0)
            tt = (parts[:, 2] * sc).sum(0) + ((parts[:, 0] - mm) * parts[:, 1] * sc).sum(0)
            out[s:s + chunk] = torch.log(zz) - tt / zz
        else:
            out[s:s + chunk] = torch.log(z) - t / z
    return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Non-blocking device->host copy (pinned on CUDA); a fresh tensor, never a view."""
    if t.device.type == "cpu":
        return t.clone()
    return t.to("cpu", non_blocking=True)


class _Pending:
    """What one forward produced for the tap, waiting for result processing."""

    __slots__ = ("event", "ext_rids", "ext_lens", "ext_prefix", "ext_prompt", "ext_tokens",
                 "ext_cap", "stats", "rows", "dec_rids", "dec_steps", "dec_rows")

    def __init__(self):
        self.event = None
        self.ext_rids: list[str] = []
        self.ext_lens: list[int] = []
        self.ext_prefix: list[int] = []
        self.ext_prompt: list[int] = []
        self.ext_tokens: list[list[int]] = []
        self.ext_cap: list[int] = []
        self.stats = None
        self.rows = None
        self.dec_rids: list[str] = []
        self.dec_steps: list[int] = []
        self.dec_rows = None


class SGLangTap:
    """Per-scheduler-process adapter state (one per process, created lazily at the first forward)."""

    def __init__(self, worker, cfg=None, sender=None):
        from lenpred.tap.config import TapConfig
        from lenpred.tap.core import Tap

        self.cfg = cfg or TapConfig.from_env()
        self.rank = tp_rank()
        self.tp = tp_size()
        runner = worker.model_runner
        self.model = runner.model
        self.weight = lm_head_of(self.model)
        self.logit_scale, self.softcap = _logit_transform(self.model)
        hidden_size = int(getattr(runner.model_config, "hidden_size", 0) or self.weight.shape[1])
        sa = getattr(worker, "server_args", None)
        self.model_id = resolve_model_id(sa)
        port = getattr(sa, "port", "") if sa is not None else ""
        self.engine_id = os.environ.get("LENPRED_ENGINE_ID") or f"{socket.gethostname()}:{port}"
        self.engine_id += f"/tp{self.rank}"
        if sender is None and self.rank == 0:
            from lenpred.tap.sender import TapSender

            sender = TapSender(self.cfg.sidecar, engine_id=self.engine_id, max_queue=self.cfg.queue)
        self.sender = sender if self.rank == 0 else None
        self.tap = Tap(self.cfg, model_id=self.model_id, hidden_size=hidden_size,
                       engine_id=self.engine_id, sender=self.sender) if self.rank == 0 else None
        self.errors = 0
        self._warned: set[str] = set()
        self._prefill_sent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
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
        log.info("lenpred tap active: model_id=%s hidden=%d tp_rank=%d sends=%s", self.model_id,
                 hidden_size, self.rank, self.rank == 0)

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
                           "with --return-hidden-states-mode full (prefill/decode vectors are "
                           "not sent; finished events still are)")
            return
        reqs = batch.reqs
        p = _Pending()
        if is_decode:
            if self.rank != 0:
                return
            seq = getattr(batch, "seq_lens_cpu", None)
            if seq is None:
                self.warn_once("seq", "decode batch without seq_lens_cpu; decode vectors skipped")
                return
            seq = seq.tolist()
            keep, steps = [], []
            for i, r in enumerate(reqs):
                if r.rid.startswith(HEALTH_PREFIX):
                    continue
                step = int(seq[i]) - len(r.origin_input_ids)
                if step > 0 and step % self.cfg.every == 0:
                    keep.append(i)
                    steps.append(step)
            if not keep:
                return
            idx = torch.tensor(keep, device=hs.device)
            p.dec_rids = [reqs[i].rid for i in keep]
            p.dec_steps = steps
            p.dec_rows = _to_host(hs.index_select(0, idx))
        else:
            ext = [int(x) for x in batch.extend_lens]
            pre = [int(x) for x in batch.prefix_lens]
            n_rows = sum(ext)
            if hs.shape[0] < n_rows:
                self.warn_once("rows", "hidden states have %d rows for %d extend tokens; skipped",
                               hs.shape[0], n_rows)
                return
            # prompt rows of each request: positions [pre, pre+ext) that are < prompt_len
            sel: list[tuple[int, int, int]] = []  # (req index, row offset, prompt rows)
            dec: list[tuple[int, int, int]] = []  # MIXED / re-prefill: (req, last row, step)
            off = 0
            for i, r in enumerate(reqs):
                plen = len(r.origin_input_ids)
                n_prompt = max(0, min(ext[i], plen - pre[i]))
                if (n_prompt > 0 and r.rid not in self._prefill_sent
                        and not r.rid.startswith(HEALTH_PREFIX)):
                    sel.append((i, off, n_prompt))
                step = pre[i] + ext[i] - plen
                if step > 0 and step % self.cfg.every == 0 and not r.rid.startswith(HEALTH_PREFIX):
                    dec.append((i, off + ext[i] - 1, step))
                off += ext[i]
            if not sel and not dec:
                return
            if sel:
                contiguous = len(sel) == len(reqs) and all(n == ext[i] for i, _, n in sel)
                if contiguous:
                    h = hs[:n_rows]
                else:
                    idx = torch.cat([torch.arange(o, o + n, device=hs.device) for _, o, n in sel])
                    h = hs.index_select(0, idx)
                # LENPRED_TAP_POOL=0: no entropy pool is shipped, so skip its full-vocabulary logits
                # (the dominant prefill cost); the last-token state still rides in the summaries
                ent = (prompt_entropy(h, self.weight, logit_scale=self.logit_scale,
                                      softcap=self.softcap, gather=self._gather)
                       if self.cfg.pool else torch.zeros(h.shape[0], dtype=torch.float32, device=h.device))
                if self.rank != 0:
                    return
                from lenpred.tap.pooling import segment_stats

                lens = [n for _, _, n in sel]
                p.ext_rids = [reqs[i].rid for i, _, _ in sel]
                p.ext_lens = lens
                p.ext_prefix = [pre[i] for i, _, _ in sel]
                p.ext_prompt = [len(reqs[i].origin_input_ids) for i, _, _ in sel]
                p.ext_cap = [max_new_tokens(reqs[i]) for i, _, _ in sel]
                p.stats = tuple(_to_host(t) for t in segment_stats(h, ent, lens, self.cfg.tau))
                if self.cfg.prefix_store_tokens > 0:
                    # origin_input_ids may be an array.array: the PrefixStore compares lists
                    p.ext_tokens = [list(reqs[i].origin_input_ids) for i, _, _ in sel]
                    p.rows = (_to_host(h.to(torch.float16)), _to_host(ent))
                for rid, pr, n, plen in zip(p.ext_rids, p.ext_prefix, lens, p.ext_prompt):
                    if pr + n >= plen:  # prompt complete: a later re-prefill (retraction) is not re-sent
                        self._remember(self._prefill_sent, rid)
            elif self.rank != 0:
                return
            if dec:
                idx = torch.tensor([row for _, row, _ in dec], device=hs.device)
                p.dec_rids = [reqs[i].rid for i, _, _ in dec]
                p.dec_steps = [s for _, _, s in dec]
                p.dec_rows = _to_host(hs.index_select(0, idx))
        if hs.device.type == "cuda":
            p.event = torch.cuda.Event()
            p.event.record()
        setattr(result, _ATTR, p)

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
                from lenpred.tap.pooling import states_from_stats

                pieces = states_from_stats(p.stats, p.ext_lens)
                self.tap.on_extend_pieces(p.ext_rids, pieces, p.ext_lens, p.ext_prompt, p.ext_prefix,
                                          p.ext_tokens or None, rows=p.rows, max_new_tokens=p.ext_cap)
            if p.dec_rids:
                # overlap scheduling runs one more decode step for a request whose finish is only
                # seen when the previous step's result is processed: drop rows of finished requests
                keep = [i for i, rid in enumerate(p.dec_rids) if rid not in self._finished]
                if len(keep) == len(p.dec_rids):
                    self.tap.on_decode(p.dec_rids, p.dec_steps, p.dec_rows)
                elif keep:
                    self.tap.on_decode([p.dec_rids[i] for i in keep], [p.dec_steps[i] for i in keep],
                                       p.dec_rows[keep])
        if batch is not None:
            from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH

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

"""BENCHMARK HARNESS: make a real SGLang engine answer with exactly the length a trace says, without
telling anyone that length.

Replaying a length trace on real engines needs each answer to stop at its trace length L. The
obvious way, `ignore_eos` + `max_new_tokens = L`, leaks L twice: the router caps every estimate at
the request's `max_new_tokens` (so a length-aware policy would see the truth), and SGLang's own
admission reserves KV for `max_new_tokens` (so the engine would pack with oracle knowledge). Real
clients send a generic cap. So the request carries a generic cap (`max_new_tokens = cap`) and this
custom logit processor ends the answer at L: it bans the EOS token before the L-th answer token and
forces it at the L-th. The engine therefore stops on EOS (finish reason `stop`) after exactly L
tokens, and neither the router nor SGLang's scheduler knows L beforehand.

The processor runs inside SGLang's scheduler (start it with `--enable-custom-logit-processor`);
SGLang unpickles it by reference, so `lenpred.harness.lengthctl` must be importable there (it is
when lenpred is installed). Its parameters ride in `sampling_params.custom_params`, which the
router forwards untouched:

    lenpred_len     L, the whole answer's length (tokens)
    lenpred_prompt  the original prompt length; a continuation (the router moved or capped the
                    request and resent prompt + answer so far) has a longer prompt, and the
                    difference is how much of the answer is already done
    lenpred_eos     the EOS token id the engine stops on

Answer tokens are counted per rid, one per sampling call (chunked-prefill rows, which SGLang
samples and discards, are skipped); counting calls rather than reading `req.output_ids` keeps the
count right under SGLang's overlap scheduler, where `output_ids` lags the batch being sampled.
A retracted request keeps its count (SGLang keeps its output and resumes). `check()` in the bench
verifies the lengths on the live engines before any measurement.
"""
from __future__ import annotations

import collections
import json
import pickle
from typing import Any

import torch

_MAX_TRACKED = 200_000   # rids remembered per engine process (LRU); far above what runs at once


class ForceLength:
    """Ends each answer at `custom_params["lenpred_len"]` tokens (see the module docstring). SGLang
    only calls it, so it needs no SGLang base class (and the client needs no SGLang to send it)."""

    counts: "collections.OrderedDict[str, int]" = collections.OrderedDict()

    def __call__(self, logits: torch.Tensor, custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        ban, force = [], []
        for i, params in enumerate(custom_param_list or []):
            target = answer_tokens_left(params)
            req = params.get("__req__")
            if target is None or req is None or getattr(req, "is_chunked", 0) > 0:
                continue
            n = ForceLength.counts.pop(req.rid, 0) + 1   # the token being sampled now
            ForceLength.counts[req.rid] = n
            if len(ForceLength.counts) > _MAX_TRACKED:
                ForceLength.counts.popitem(last=False)
            (force if n >= target else ban).append((i, int(params.get("lenpred_eos", 2))))
        for i, eos in ban:
            logits[i, eos] = -float("inf")
        for i, eos in force:
            logits[i, :] = -float("inf")
            logits[i, eos] = 0.0
        return logits


def answer_tokens_left(params: dict) -> int | None:
    """Answer tokens this attempt must produce (None: not a length-controlled request)."""
    if "lenpred_len" not in params:
        return None
    req = params.get("__req__")
    done = 0
    if req is not None and "lenpred_prompt" in params:
        done = max(len(req.origin_input_ids) - int(params["lenpred_prompt"]), 0)
    return max(int(params["lenpred_len"]) - done, 1)


def controlled(body: dict, length: int, prompt_tokens: int, cap: int, eos: int) -> dict:
    """`body` (a /generate request) made to answer with exactly `length` tokens under a generic
    `cap` that is all the router and SGLang see."""
    sp = body.setdefault("sampling_params", {})
    sp["max_new_tokens"] = cap
    sp["ignore_eos"] = False
    sp["custom_params"] = {**(sp.get("custom_params") or {}), "lenpred_len": int(length),
                           "lenpred_prompt": int(prompt_tokens), "lenpred_eos": int(eos)}
    body["custom_logit_processor"] = PROCESSOR
    return body


# SGLang's wire form of a processor (`CustomLogitProcessor.to_str`): the class pickled by reference,
# hex in JSON; SGLang loads it with dill, which reads plain pickles.
PROCESSOR = json.dumps({"callable": pickle.dumps(ForceLength).hex()})

"""Continuing a request elsewhere: the body that resumes an answer from the tokens generated so far,
and the merge of the parts into one response. Used by FCR (batch caps) and by preemption.

SGLang 0.5.23 forms: `/generate` appends the output ids (or text) to the input; `/v1/completions`
appends the text to the prompt; `/v1/chat/completions` appends an assistant message with the partial
answer and sets `continue_final_message` so the chat template leaves it open. The prefix cache makes
the re-prefill cheap on the same replica; on another replica it costs one prefill of prompt + prefix.
`custom_params.lenpred_prefix_tokens` tells the engine emulator how much of the answer is in the prompt.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from lenpred.router.parsing import max_tokens_of


@dataclass
class Part:
    """What one attempt produced."""

    text: str
    ids: list[int]
    tokens: int
    finish: str                  # stop | length | abort | ...
    payload: dict = field(repr=False, default_factory=dict)


def part_of(payload: dict, api: str) -> Part:
    if api == "generate":
        meta = payload.get("meta_info") or {}
        fr = meta.get("finish_reason")
        finish = fr.get("type", "") if isinstance(fr, dict) else str(fr or "")
        ids = payload.get("output_ids") or []
        return Part(payload.get("text", ""), list(ids), int(meta.get("completion_tokens", len(ids))), finish, payload)
    choice = (payload.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") if api == "chat" else choice.get("text")
    return Part(text or "", [], int((payload.get("usage") or {}).get("completion_tokens", 0)),
                str(choice.get("finish_reason") or ""), payload)


def _set_cap(body: dict, api: str, cap: int | None) -> None:
    if cap is None:
        return
    if api == "generate":
        body.setdefault("sampling_params", {})["max_new_tokens"] = cap
    elif api == "chat" and "max_completion_tokens" in body:
        body["max_completion_tokens"] = cap
    else:
        body["max_tokens"] = cap


def with_cap(body: dict, api: str, cap: int | None) -> dict:
    """A copy of `body` whose output is capped at `cap` tokens (None: unchanged)."""
    out = copy.deepcopy(body)
    _set_cap(out, api, cap)
    return out


def continuation(body: dict, api: str, parts: list[Part], cap: int | None = None) -> dict:
    """The body that resumes `body` after `parts`; its own max tokens shrink by what was generated,
    then `cap` (if any) applies on top."""
    out = copy.deepcopy(body)
    done = sum(p.tokens for p in parts)
    text = "".join(p.text for p in parts)
    if api == "generate":
        if isinstance(out.get("input_ids"), list):
            out["input_ids"] = list(out["input_ids"]) + [i for p in parts for i in p.ids]
        else:
            out["text"] = (out.get("text") or "") + text
    elif api == "completions":
        prompt = out.get("prompt")
        out["prompt"] = (prompt[0] if isinstance(prompt, list) and prompt else prompt or "") + text
    else:
        msgs = list(out.get("messages") or [])
        msgs.append({"role": "assistant", "content": text})
        out["messages"] = msgs
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
    custom = out.setdefault("custom_params", {})
    custom["lenpred_prefix_tokens"] = int(custom.get("lenpred_prefix_tokens", 0)) + done
    own = max_tokens_of(body, api)
    left = None if own is None else max(own - done, 1)
    limit = min(x for x in (left, cap) if x is not None) if (left or cap) else None
    _set_cap(out, api, limit)
    return out


def merge(parts: list[Part], api: str) -> dict:
    """One response from the parts, as if one replica had produced it all."""
    if len(parts) == 1:
        return parts[0].payload
    first, last = parts[0].payload, parts[-1].payload
    out = copy.deepcopy(last)
    text = "".join(p.text for p in parts)
    n = sum(p.tokens for p in parts)
    timing = _merged_timing(parts)
    if api == "generate":
        out["text"] = text
        out["output_ids"] = [i for p in parts for i in p.ids]
        meta = out.setdefault("meta_info", {})
        meta["id"] = (first.get("meta_info") or {}).get("id", meta.get("id"))
        meta["completion_tokens"] = n
        meta["prompt_tokens"] = (first.get("meta_info") or {}).get("prompt_tokens", meta.get("prompt_tokens"))
        if isinstance(meta.get("finish_reason"), dict):
            meta["finish_reason"]["length"] = n
        meta["lenpred_parts"] = len(parts)
        if timing:
            meta["emulated_timing"] = timing
        return out
    choice = out["choices"][0]
    if api == "chat":
        choice.setdefault("message", {})["content"] = text
    else:
        choice["text"] = text
    usage = out.setdefault("usage", {})
    usage["completion_tokens"] = n
    usage["prompt_tokens"] = (first.get("usage") or {}).get("prompt_tokens", usage.get("prompt_tokens", 0))
    usage["total_tokens"] = usage["prompt_tokens"] + n
    out["id"] = first.get("id", out.get("id"))
    out["lenpred_parts"] = len(parts)
    if timing:
        out["emulated_timing"] = timing
    return out


def _timing_of(payload: dict) -> dict | None:
    return (payload.get("meta_info") or {}).get("emulated_timing") or payload.get("emulated_timing")


def _merged_timing(parts: list[Part]) -> dict | None:
    """Emulator timing across parts: the first token of the first part; the decode span runs to the
    last token of the last part (each later part adds its queue + prefill and its decode)."""
    ts = [_timing_of(p.payload) for p in parts]
    if not all(t and t.get("ttft_s") is not None for t in ts):
        return None
    decode = (ts[0].get("decode_s") or 0.0) + sum(t["ttft_s"] + (t.get("decode_s") or 0.0) for t in ts[1:])
    return {"ttft_s": ts[0]["ttft_s"], "decode_s": decode,
            "retractions": sum(t.get("retractions", 0) for t in ts), "parts": len(parts)}

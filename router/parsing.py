"""What the router reads from an OpenAI / SGLang request body. It has no tokenizer (it must stay
light), so prompt lengths are estimated from characters; exact ids are counted when given."""
from __future__ import annotations

from typing import Any

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "generate": "/generate"}
"""The engine path of each API the router serves (the same paths on the router and on SGLang)."""
APIS = {path: api for api, path in PATHS.items()}

CHARS_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 4   # role markers of a chat template
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI / SGLang CompletionRequest default
GENERATE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang SamplingParams default


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prompt_of(body: dict, api: str) -> tuple[str, int]:
    """(prompt text for prefix matching, estimated prompt tokens)."""
    if api == "chat":
        msgs = body.get("messages") or []
        text = "".join(f"<{m.get('role', '')}>{_text_of(m.get('content'))}" for m in msgs if isinstance(m, dict))
        return text, len(text) // CHARS_PER_TOKEN + CHAT_TOKENS_PER_MESSAGE * len(msgs)
    prompt = body.get("prompt") if api == "completions" else (body.get("text") or body.get("input_ids"))
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]  # batched prompts: routed together, judged by the first
    if isinstance(prompt, list):  # token ids
        return " ".join(map(str, prompt)), len(prompt)
    text = prompt if isinstance(prompt, str) else ""
    return text, max(len(text) // CHARS_PER_TOKEN, 1)


def max_tokens_of(body: dict, api: str) -> int | None:
    if api == "chat":
        v = body.get("max_completion_tokens") or body.get("max_tokens")
    elif api == "completions":
        v = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    else:
        v = (body.get("sampling_params") or {}).get("max_new_tokens", GENERATE_DEFAULT_MAX_NEW_TOKENS)
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


def usage_of(payload: dict, api: str) -> int | None:
    """Completion tokens reported in a non-streamed response."""
    if api == "generate":
        return (payload.get("meta_info") or {}).get("completion_tokens")
    return (payload.get("usage") or {}).get("completion_tokens")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(body: dict, key: str, lo: int, hi: int, where: str = "") -> None:
    if key not in body or body[key] is None:
        return
    v = body[key]
    if not _is_int(v):
        raise ValueError(f"`{where}{key}` must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"`{where}{key}` must be between {lo} and {hi}, got {v}")


def _check_tokens(v: Any, what: str) -> None:
    """Token ids: a list of ints, or (batched) a list of such lists."""
    if not isinstance(v, list):
        raise ValueError(f"`{what}` must be a list of token ids")
    for x in v:
        if isinstance(x, list):
            if not all(_is_int(i) for i in x):
                raise ValueError(f"`{what}` must hold integers")
        elif not _is_int(x):
            raise ValueError(f"`{what}` must hold integers or lists of integers")


def check(body: dict, api: str, max_tokens: int, max_abs_priority: int) -> None:
    """Refuse (ValueError, answered 400) what the router reads or sets and could not use: wrong
    types, out-of-range numbers (`max_tokens: 1e30`, `priority: 1e30`). Everything else the engine
    validates itself, as it does without the router."""
    for key in ("stream",):
        if key in body and not isinstance(body[key], bool):
            raise ValueError(f"`{key}` must be true or false")
    for key in ("custom_params", "stream_options"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise ValueError(f"`{key}` must be an object")
    _check_int(body, "priority", -max_abs_priority, max_abs_priority)
    if api == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("`messages` must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"`messages[{i}]` must be an object")
            content = m.get("content")
            if isinstance(content, list):
                for p in content:
                    if not isinstance(p, dict) or not isinstance(p.get("text", ""), str):
                        raise ValueError(f"`messages[{i}].content` parts must be objects with a string `text`")
            elif content is not None and not isinstance(content, str):
                raise ValueError(f"`messages[{i}].content` must be a string or a list of parts")
            if not isinstance(m.get("role", ""), str):
                raise ValueError(f"`messages[{i}].role` must be a string")
        _check_int(body, "max_tokens", 1, max_tokens)
        _check_int(body, "max_completion_tokens", 1, max_tokens)
    elif api == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            pass
        elif isinstance(prompt, list):
            _check_tokens(prompt, "prompt")
        elif not isinstance(prompt, str):
            raise ValueError("`prompt` must be a string, a list of strings or token ids")
        _check_int(body, "max_tokens", 1, max_tokens)
    else:
        text, ids = body.get("text"), body.get("input_ids")
        if text is None and ids is None:
            raise ValueError("one of `text` and `input_ids` is required")
        if text is not None and not (isinstance(text, str) or (
                isinstance(text, list) and text and all(isinstance(t, str) for t in text))):
            raise ValueError("`text` must be a string or a list of strings")
        if ids is not None:
            _check_tokens(ids, "input_ids")
        sp = body.get("sampling_params")
        if sp is not None:
            if not isinstance(sp, dict):
                raise ValueError("`sampling_params` must be an object")
            _check_int(sp, "max_new_tokens", 0, max_tokens, "sampling_params.")

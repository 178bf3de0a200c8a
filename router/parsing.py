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

"""Prompt-file adapters for the formats in ../shared/data, with clear errors for bad files.

Every adapter yields Prompt(id, messages, dataset). Formats:
  sharegpt       {"id", "prompt", ...}                     (sharegpt/first_turn.jsonl)
  gsm8k          {"question", "answer"}                    (gsm8k/train.jsonl)
  self-instruct  {"id", "instruction", "instances": [{"input"}]}
  mt-bench       {"question_id", "turns": [...]}           (first turn only)
  vicuna-bench   {"question_id", "turns": [...]}           (same shape as mt-bench)
  plain          {"prompt": str} or {"messages": [{"role", "content"}, ...]} (optional "id", and
                 "dataset" with messages: the subsets `lenpred.train.prepare_prompts` writes)
  auto           decided per file from the first record's fields
"""
from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass

FORMATS = ("auto", "sharegpt", "gsm8k", "self-instruct", "mt-bench", "vicuna-bench", "plain")


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and line."""


@dataclass
class Prompt:
    id: str
    messages: list[dict]
    dataset: str

    @property
    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m.get("role") == "user")


def detect(rec: dict) -> str | None:
    if "messages" in rec:
        return "plain"
    if "question" in rec and "answer" in rec:
        return "gsm8k"
    if "instruction" in rec:
        return "self-instruct"
    if "turns" in rec:
        return "mt-bench"
    if "prompt" in rec:
        return "sharegpt" if "response" in rec else "plain"
    if "question" in rec:
        return "gsm8k"
    return None


def _convert(rec: dict, fmt: str, where: str, idx: int, dataset: str) -> Prompt:
    def need(key, typ=str):
        v = rec.get(key)
        if not isinstance(v, typ) or (typ is str and not v.strip()):
            raise PromptFileError(f"{where}: format {fmt!r} needs a non-empty {key!r} "
                                  f"({typ.__name__}); record has keys {sorted(rec)}")
        return v

    rid = rec.get("id", rec.get("question_id"))
    if fmt == "sharegpt":
        text = need("prompt")
    elif fmt == "gsm8k":
        text = need("question")
    elif fmt == "self-instruct":
        text = need("instruction")
        inst = rec.get("instances") or []
        inp = (inst[0].get("input") or "") if inst and isinstance(inst[0], dict) else ""
        if inp.strip():
            text = f"{text}\n\n{inp}"
    elif fmt in ("mt-bench", "vicuna-bench"):
        turns = need("turns", list)
        if not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise PromptFileError(f"{where}: 'turns' must start with a non-empty string")
        text = turns[0]
    elif fmt == "plain":
        if "messages" in rec:
            msgs = need("messages", list)
            ok = msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                              and isinstance(m.get("content"), str) for m in msgs)
            if not ok:
                raise PromptFileError(f"{where}: 'messages' must be a non-empty list of "
                                      "{'role': str, 'content': str}")
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise PromptFileError(f"{where}: 'messages' holds no turn before the reply")
            return Prompt(str(rid if rid is not None else idx), [dict(role=m["role"], content=m["content"]) for m in msgs],
                          str(rec.get("dataset") or dataset))
        text = need("prompt")
    else:
        raise PromptFileError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return Prompt(str(rid if rid is not None else idx), [{"role": "user", "content": text}], dataset)


def dataset_name(path: pathlib.Path) -> str:
    stem = path.stem
    for key in ("sharegpt", "gsm8k", "self_instruct", "mt_bench", "vicuna"):
        if key in str(path).lower():
            return key
    return stem


def load_prompts(path: str | pathlib.Path, fmt: str = "auto", limit: int | None = None,
                 dataset: str | None = None) -> list[Prompt]:
    """Read a jsonl prompt file. Raises PromptFileError with file and line on any problem."""
    p = pathlib.Path(path)
    if fmt not in FORMATS:
        raise PromptFileError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not p.exists():
        raise PromptFileError(f"prompt file {p} does not exist")
    if not p.is_file():
        raise PromptFileError(f"prompt file {p} is not a file")
    ds = dataset or dataset_name(p)
    out: list[Prompt] = []
    chosen = None if fmt == "auto" else fmt
    with p.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: not JSON lines (one JSON object per line): {e.msg}") from None
            if not isinstance(rec, dict):
                raise PromptFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if chosen is None:
                chosen = detect(rec)
                if chosen is None:
                    raise PromptFileError(
                        f"{where}: no recognisable prompt field (looked for prompt, messages, question, "
                        f"instruction, turns); record has keys {sorted(rec)}; pass --format")
                if "vicuna" in p.name.lower() and chosen == "mt-bench":
                    chosen = "vicuna-bench"
            out.append(_convert(rec, chosen, where, len(out), ds))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise PromptFileError(f"prompt file {p} holds no records")
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):  # make ids unique (split-by-prompt keys on them)
        seen: dict[str, int] = {}
        for q in out:
            k = seen.get(q.id, 0)
            seen[q.id] = k + 1
            if k:
                q.id = f"{q.id}#{k}"
    return out


def prompts_hash(prompts: list[Prompt]) -> str:
    h = hashlib.sha256()
    for q in prompts:
        h.update(q.id.encode())
        h.update(json.dumps(q.messages, sort_keys=True).encode())
    return h.hexdigest()[:16]

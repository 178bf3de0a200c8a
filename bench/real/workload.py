"""The replayed workload: real prompt and output lengths, random token ids, length-controlled bodies.

Traces (`--trace KIND:PATH`):
  sharegpt:FILE   ShareGPT first turns with ChatGPT's real replies (`{"id","prompt","response"}`,
                  ../shared/data/sharegpt/first_turn.jsonl), both tokenized with `--tokenizer`
  lengths:FILE    the same, prepared once (`prepare()`: {"items": [[id, prompt, output], ...]})
  seqsched:FILE   seed B's Vicuna-7B output lengths (column `L_t0.0`), fixed prompt length
Items are filtered as SGLang's own `bench_serving` filters ShareGPT (prompt and output >= 4 tokens,
prompt <= 1024, prompt + output <= 2048), shuffled with the seed, and optionally shrunk by
`length_scale` (the CPU smoke run divides both lengths by 8).

The engines serve dummy weights, so each prompt is `prompt_tokens` random ids, seeded by the item
and a salt that changes per run (no prefix-cache hits carry over from one run to the next).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from lenpred.harness.inject import Item
from lenpred.harness.lengthctl import controlled

MAX_PROMPT, MAX_TOTAL, MIN_TOKENS = 1024, 2048, 4    # SGLang bench_serving's ShareGPT filter


def _tokenized(path: str, tokenizer: str) -> list[tuple[str, int, int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rows = [json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]   # not splitlines: U+2028 occurs in texts
    if not rows or not all({"id", "prompt", "response"} <= set(r) for r in rows):
        raise ValueError(f"{path}: expected JSON lines with id, prompt and response (ShareGPT first turns)")
    prompts = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    replies = tok([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
    return [(str(r["id"]), len(p), len(o)) for r, p, o in zip(rows, prompts, replies)]


def read_trace(spec: str, tokenizer: str | None = None, prompt_tokens: int = 128) -> tuple[list, dict]:
    """(id, prompt tokens, output tokens) rows of a trace, and its description."""
    kind, _, path = spec.partition(":")
    if kind == "sharegpt":
        if not tokenizer:
            raise ValueError("--trace sharegpt:FILE needs --tokenizer DIR (or prepare a lengths file)")
        return _tokenized(path, tokenizer), {"trace": spec, "tokenizer": tokenizer}
    if kind == "lengths":
        data = json.loads(Path(path).read_text())
        return [tuple(x) for x in data["items"]], {"trace": spec, **{k: v for k, v in data.items() if k != "items"}}
    if kind == "seqsched":
        file, _, column = path.partition("#")
        data = json.loads(Path(file).read_text())
        col = column or "L_t0.0"
        return ([(str(d["id"]), prompt_tokens, int(d[col])) for d in data],
                {"trace": spec, "column": col, "prompt_tokens": f"fixed {prompt_tokens} (the trace has no prompts)"})
    raise ValueError(f"unknown trace kind {kind!r}: sharegpt:FILE, lengths:FILE or seqsched:FILE[#COLUMN]")


def prepare(sharegpt: str, tokenizer: str, out: str) -> int:
    """Tokenize a ShareGPT file once into a small lengths file (what the GPU run carries)."""
    rows, desc = read_trace(f"sharegpt:{sharegpt}", tokenizer)
    Path(out).write_text(json.dumps({"source": sharegpt, "tokenizer": Path(tokenizer).name, "items": rows}))
    return len(rows)


@dataclass
class Workload:
    items: list[Item]
    description: dict

    @classmethod
    def load(cls, spec: str, *, tokenizer: str | None = None, pool: int = 3000, seed: int = 0,
             length_scale: float = 1.0, prompt_tokens: int = 128, cap_base: int = 2048) -> "Workload":
        """Item i carries the cap `cap_base + i` (lenpred.harness.inject)."""
        rows, desc = read_trace(spec, tokenizer, prompt_tokens)
        kept = [r for r in rows if r[1] >= MIN_TOKENS and r[2] >= MIN_TOKENS and r[1] <= MAX_PROMPT
                and r[1] + r[2] <= MAX_TOTAL]
        random.Random(seed).shuffle(kept)
        passed, kept = len(kept), kept[:pool]
        if not kept:
            raise ValueError(f"{spec}: no items left after the filter")
        s = max(length_scale, 1.0)
        items = [Item(id=i, index=k, prompt_tokens=max(math.ceil(p / s), 1), output_tokens=max(math.ceil(o / s), 1),
                      cap=cap_base + k) for k, (i, p, o) in enumerate(kept)]
        n = len(items)
        desc.update(kept=passed, of=len(rows), pool=n, seed=seed, length_scale=s,
                    filter=f"prompt and output >= {MIN_TOKENS}, prompt <= {MAX_PROMPT}, prompt + output <= {MAX_TOTAL}",
                    prompt_mean=sum(x.prompt_tokens for x in items) / n,
                    output_mean=sum(x.output_tokens for x in items) / n,
                    output_p50=sorted(x.output_tokens for x in items)[n // 2],
                    output_max=max(x.output_tokens for x in items), prompt_max=max(x.prompt_tokens for x in items),
                    cap_base=cap_base)
        return cls(items, desc)

    def poisson(self, rate: float, seconds: float, seed: int) -> list[tuple[float, Item]]:
        """Arrival offsets of a Poisson stream at `rate` req/s for `seconds`, items in pool order."""
        rng, t, out = random.Random(f"arrivals:{seed}"), 0.0, []
        while True:
            t += rng.expovariate(rate)
            if t >= seconds:
                return out
            if len(out) == len(self.items):
                raise ValueError(f"{rate} req/s for {seconds} s needs more than the {len(self.items)} items "
                                 "in the pool: raise --pool")
            out.append((t, self.items[len(out)]))


def distinct_prompts(items: list[Item]) -> list[Item]:
    """The same items with pairwise distinct prompt lengths, each raised as little as possible
    (in order of length). Batch runs need it: the router's 1-token probes can only be told apart by
    prompt length (lenpred.harness.inject); output lengths are untouched."""
    out, prev = {}, 0
    for it in sorted(items, key=lambda x: (x.prompt_tokens, x.index)):
        p = max(it.prompt_tokens, prev + 1)
        out[it.index], prev = dataclasses.replace(it, prompt_tokens=p), p
    return [out[it.index] for it in items]


def prompt_ids(item: Item, salt: str, vocab: int = 30000) -> list[int]:
    rng = random.Random(f"{salt}:{item.id}")
    return [rng.randrange(100, vocab) for _ in range(item.prompt_tokens)]


def body(item: Item, salt: str, eos: int, priority: int | None = None, length_control: str = "eos") -> dict:
    """A /generate request that answers with exactly `item.output_tokens` tokens.

    eos: the generic cap `item.cap` is all the router and SGLang see (lengthctl); max-new-tokens:
    `ignore_eos` + `max_new_tokens = L`, the fallback that leaks L to both."""
    b = {"input_ids": prompt_ids(item, salt), "sampling_params": {"temperature": 0.0}}
    if length_control == "eos":
        controlled(b, item.output_tokens, item.prompt_tokens, item.cap, eos)
    else:
        b["sampling_params"].update(max_new_tokens=item.output_tokens, ignore_eos=True)
    if priority is not None:
        b["priority"] = priority
    return b


def prompt_priority(item: Item) -> int:
    """SGLang-priority baseline: shortest prompt first, in the size classes lenpred's SRPT orderer
    uses for predicted lengths (-ceil(log2(1 + tokens)); larger runs first, SGLang's default)."""
    return -math.ceil(math.log2(1 + item.prompt_tokens))

"""`python -m lenpred.train.prepare_prompts --out FILE`: the prompt subset a collection machine needs.

Reads ../shared/data (ShareGPT first turns, GSM8K train, the three general sets), draws a seeded
sample from each, drops exact duplicate texts (the same text under two ids would put one prompt on
both sides of a split by prompt key), and writes one jsonl of
{"id", "dataset", "messages": [{"role": "user", "content": ...}]} records, interleaved by a seeded
shuffle so that a time-limited collection, which takes prompts in file order, gets the same mix at
any length. Splits are by the key "dataset:id" (lenpred.train.data.split_by_prompt), unchanged by
this file's order. A few MB for a few thousand prompts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import random
import sys

from lenpred.train.prompts import load_prompts

SOURCES = {  # dataset -> file under the data root
    "sharegpt": "sharegpt/first_turn.jsonl",
    "gsm8k": "gsm8k/train.jsonl",
    "self_instruct": "general/self_instruct_seed_tasks.jsonl",
    "mt_bench": "general/mt_bench_questions.jsonl",
    "vicuna": "general/vicuna_bench_questions.jsonl",
}


def default_root() -> pathlib.Path:
    """../shared/data beside the checkout (or beside the folder of worktrees)."""
    here = pathlib.Path(__file__).resolve().parents[2]
    for cand in (here.parent / "shared" / "data", here.parent.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lenpred.train.prepare_prompts", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="data root (default: ../shared/data next to the checkout)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sharegpt", type=int, default=1800)
    ap.add_argument("--gsm8k", type=int, default=1800)
    ap.add_argument("--general", type=int, default=400, help="self-instruct + MT-bench + Vicuna (all: 335)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first N of each seeded shuffle")
    ap.add_argument("--max-chars", type=int, default=6000, help="drop longer prompts (they exceed 1,024 tokens)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    root = pathlib.Path(a.data) if a.data else default_root()
    if not root.is_dir():
        print(f"prepare_prompts: data root {root} not found (pass --data)", file=sys.stderr)
        return 2
    rng = random.Random(a.seed)
    picked, seen = [], set()
    want = {"sharegpt": a.sharegpt, "gsm8k": a.gsm8k}
    general = []
    for ds, rel in SOURCES.items():
        ps = [q for q in load_prompts(root / rel, dataset=ds) if len(q.text) <= a.max_chars]
        rng.shuffle(ps)
        ps = ps[a.offset:]
        if ds in want:
            ps = ps[:want[ds]]
        else:
            general += ps
            continue
        picked += ps
    picked += general[:a.general]
    rng.shuffle(picked)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = {}
    with out.open("w") as f:
        for q in picked:
            h = hashlib.sha256(q.text.strip().encode()).hexdigest()
            if h in seen:
                continue
            seen.add(h)
            n[q.dataset] = n.get(q.dataset, 0) + 1
            f.write(json.dumps({"id": q.id, "dataset": q.dataset, "messages": q.messages}) + "\n")
    print(json.dumps({"out": str(out), "prompts": sum(n.values()), "by_dataset": n,
                      "bytes": out.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lenpred collect`: run the real engine model over prompt files and record length traces.

The prompt side goes through the same Tap/pooling code the engine adapter uses
(`lenpred.tap.core.Tap.on_extend` -> `tap.pooling.summarize_segments`), so the training features
are the serving features. Decode states are the final-layer (post-norm) hidden states.

Conventions (must match the engine tap):
  * output length L = generated tokens including the EOS token (SGLang's completion_tokens);
  * decode step t = tokens generated so far; the state recorded at step t is the hidden state of
    the forward pass that consumed the t-th generated token (it predicts token t+1), and the PLP
    target there is the remaining length L - t. Step 0 is the prompt's last position.
  * replies that hit --max-new-tokens are `capped` (censored: true length >= cap).

Output: DIR/shard-XXXXX.npz per --shard-size prompts (atomic write; existing shards are skipped,
so an interrupted run resumes), DIR/manifest.json. Shard arrays:
  prompt level [P]: prompt_id, dataset, text, prompt_tokens, pooled/mean/last [P,d] f16,
                    ent_mean, ent_std, ent_max, ent_last
  request level [R=P*K]: req_prompt (row in P), req_sample, length, capped
  decode rows [M]: dec_req (row in R), dec_step, dec_vec [M,d] f16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from lenpred.train.prompts import FORMATS, PromptFileError, load_prompts, prompts_hash


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lenpred collect", description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", required=True, help="jsonl prompt file (comma-separated for several)")
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=1, help="samples per prompt (one-to-many)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024,
                    help="longer prompts are skipped (counted in the manifest)")
    ap.add_argument("--every", type=int, default=16, help="record a decode state every k tokens")
    ap.add_argument("--decode-samples", type=int, default=None,
                    help="record decode states for the first J samples of each prompt only (default: all)")
    ap.add_argument("--extra-steps", default="8", help="additional decode steps to record (comma list)")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts of each file")
    ap.add_argument("--offset", type=int, default=0, help="skip the first N prompts of each file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward batch (x samples rows)")
    ap.add_argument("--shard-size", type=int, default=64, help="prompts per shard file")
    ap.add_argument("--model", default=None, help="HF folder, .gguf file or known model name (default: SmolLM2)")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop after the shard that passes this")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    return ap


# ------------------------------------------------------------------------------------------ model
def load_model(path: str | None, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lenpred.model import model_id_of, resolve

    ckpt = resolve(path)  # known model name, .gguf file or HF folder; default: the shipped SmolLM2
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype, torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt).to(device).eval()
    return tok, model, model_id_of(ckpt)


def encode(tok, prompt) -> list[int]:
    ids = tok.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _sample(logits, temperature: float, top_p: float, gen):
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        cum = sp.cumsum(-1)
        sp = torch.where(cum - sp > top_p, torch.zeros_like(sp), sp)
        pick = torch.multinomial(sp, 1, generator=gen).squeeze(1)
        return si.gather(1, pick[:, None]).squeeze(1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def run_batch(model, tap, batch_ids: list[list[int]], rids: list[str], *, samples: int, temperature: float,
              top_p: float, max_new: int, record_steps: set[int], eos: set[int], gen, device,
              decode_samples: int | None = None) -> dict:
    """Prefill one batch of prompts (left padded), pool them through the Tap, then decode
    `samples` continuations of each with a KV cache. Returns per-prompt and per-request arrays."""
    import torch

    from lenpred.tap.pooling import token_entropy

    B = len(batch_ids)
    lens = [len(x) for x in batch_ids]
    Lmax = max(lens)
    pad = 0
    inp = torch.full((B, Lmax), pad, dtype=torch.long)
    mask = torch.zeros((B, Lmax), dtype=torch.long)
    for i, ids in enumerate(batch_ids):
        inp[i, Lmax - len(ids):] = torch.tensor(ids)
        mask[i, Lmax - len(ids):] = 1
    inp, mask = inp.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lm_head = model.get_output_embeddings()
    with torch.inference_mode():
        out = model.model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True)
        hid = out.last_hidden_state  # [B, Lmax, d], after the final norm
        cache = out.past_key_values
        rows = torch.cat([hid[i, Lmax - n:] for i, n in enumerate(lens)])  # [sum n, d]
        # next-token entropy at every prompt position, chunked (full-vocabulary logits)
        ent = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for s in range(0, rows.shape[0], 2048):
            ent[s:s + 2048] = token_entropy(lm_head(rows[s:s + 2048]))
        pools = tap.on_extend(rids, rows, ent, lens, lens)  # same code path as the engine
        tap.end_step()  # ship (to the in-memory outbox) and drop: the collector keeps the PoolStates
        tap.outbox.clear()
        offs = np.cumsum([0] + lens)
        ent_c = ent.cpu()
        estats = []
        for i in range(B):
            e = ent_c[offs[i]:offs[i + 1]]
            estats.append((float(e.mean()), float(e.std(unbiased=False)), float(e.max()), float(e[-1])))
        last_logits = lm_head(hid[:, -1])  # [B, V]
        # K samples per prompt: expand the cache and the masks
        K = samples
        if K > 1:
            cache.batch_repeat_interleave(K)
            mask = mask.repeat_interleave(K, 0)
            last_logits = last_logits.repeat_interleave(K, 0)
        R = B * K
        prompt_len = torch.tensor(lens, device=device).repeat_interleave(K)
        length = torch.zeros(R, dtype=torch.long)
        capped = torch.zeros(R, dtype=torch.bool)
        dec_req, dec_step, dec_vec = [], [], []
        active = torch.arange(R, device=device)  # global request index of each live row
        tok = _sample(last_logits, temperature, top_p, gen)
        eos_t = torch.tensor(sorted(eos), device=device)
        for t in range(1, max_new + 1):
            # tok = the t-th generated token of each live row
            fin = torch.isin(tok, eos_t)
            if t == max_new:
                idx = active.cpu()
                length[idx] = t
                capped[idx] = ~fin.cpu()
                break
            if fin.any():
                done = active[fin].cpu()
                length[done] = t
                keep = (~fin).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                active, tok, mask = active[keep], tok[keep], mask[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            p = (prompt_len[active] + t - 1)[:, None]
            o = model.model(input_ids=tok[:, None], attention_mask=mask, position_ids=p,
                            past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            h = o.last_hidden_state[:, -1]
            if t in record_steps:
                if decode_samples is None or decode_samples >= K:
                    sel, h_rec = active, h
                else:
                    m = (active % K) < decode_samples
                    sel, h_rec = active[m], h[m]
                dec_req.append(sel.cpu())
                dec_step.append(torch.full((sel.numel(),), t, dtype=torch.int32))
                dec_vec.append(h_rec.to(torch.float16).cpu())
            tok = _sample(lm_head(h), temperature, top_p, gen)
    d = rows.shape[1]
    return {
        "pooled": torch.stack([p.pooled() for p in pools]).to(torch.float16).cpu().numpy(),
        "mean": torch.stack([p.mean() for p in pools]).to(torch.float16).cpu().numpy(),
        "last": torch.stack([p.last for p in pools]).to(torch.float16).cpu().numpy(),
        "estats": np.array(estats, dtype=np.float32).reshape(B, 4),
        "length": length.numpy().astype(np.int32),
        "capped": capped.numpy(),
        "dec_req": (torch.cat(dec_req).numpy().astype(np.int32) if dec_req else np.zeros(0, np.int32)),
        "dec_step": (torch.cat(dec_step).numpy() if dec_step else np.zeros(0, np.int32)),
        "dec_vec": (torch.cat(dec_vec).numpy() if dec_vec else np.zeros((0, d), np.float16)),
    }


def collect_shard(model, tok, tap, prompts, encoded, *, args, record_steps, eos, gen, device) -> dict:
    P, K = len(prompts), args.samples
    order = sorted(range(P), key=lambda i: len(encoded[i]))  # less padding
    res: dict[str, list] = {k: [None] * P for k in ("pooled", "mean", "last", "estats")}
    length = np.zeros(P * K, np.int32)
    capped = np.zeros(P * K, bool)
    dreq, dstep, dvec = [], [], []
    for s in range(0, P, args.batch_size):
        idx = order[s:s + args.batch_size]
        r = run_batch(model, tap, [encoded[i] for i in idx], [f"{prompts[i].dataset}:{prompts[i].id}" for i in idx],
                      samples=K, temperature=args.temperature, top_p=args.top_p, max_new=args.max_new_tokens,
                      record_steps=record_steps, eos=eos, gen=gen, device=device,
                      decode_samples=args.decode_samples)
        for j, i in enumerate(idx):
            for k in ("pooled", "mean", "last", "estats"):
                res[k][i] = r[k][j]
        glob = np.array([i * K + k for i in idx for k in range(K)], np.int32)  # batch row -> shard request
        length[glob] = r["length"]
        capped[glob] = r["capped"]
        dreq.append(glob[r["dec_req"]])
        dstep.append(r["dec_step"])
        dvec.append(r["dec_vec"])
    d = res["pooled"][0].shape[0]
    return {
        "prompt_id": np.array([q.id for q in prompts]),
        "dataset": np.array([q.dataset for q in prompts]),
        "text": np.array([q.text for q in prompts]),
        "prompt_tokens": np.array([len(e) for e in encoded], np.int32),
        "pooled": np.stack(res["pooled"]), "mean": np.stack(res["mean"]), "last": np.stack(res["last"]),
        "ent_mean": np.stack(res["estats"])[:, 0], "ent_std": np.stack(res["estats"])[:, 1],
        "ent_max": np.stack(res["estats"])[:, 2], "ent_last": np.stack(res["estats"])[:, 3],
        "req_prompt": np.repeat(np.arange(P, dtype=np.int32), K),
        "req_sample": np.tile(np.arange(K, dtype=np.int32), P),
        "length": length, "capped": capped,
        "dec_req": np.concatenate(dreq) if dreq else np.zeros(0, np.int32),
        "dec_step": np.concatenate(dstep).astype(np.int32) if dstep else np.zeros(0, np.int32),
        "dec_vec": np.concatenate(dvec) if dvec else np.zeros((0, d), np.float16),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    # ---- prompts first: bad files fail before the model loads
    prompts = []
    try:
        for f in [x for x in args.prompts.split(",") if x]:
            ps = load_prompts(f, args.format, limit=(args.offset + args.limit) if args.limit else None)
            prompts += ps[args.offset:]
    except PromptFileError as e:
        print(f"lenpred collect: {e}", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("lenpred collect: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = args.dtype if args.dtype != "auto" else "bfloat16"
    t0 = time.time()
    tok, model, model_id = load_model(args.model, device, dtype)
    from lenpred.tap.config import TapConfig
    from lenpred.tap.core import Tap

    d = model.config.hidden_size
    tap = Tap(TapConfig(every=args.every, prefix_store_tokens=0, dtype="float32"), model_id=model_id, hidden_size=d)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    eos |= {i for i in (getattr(model.generation_config, "eos_token_id", None) or []) if isinstance(i, int)} \
        if isinstance(getattr(model.generation_config, "eos_token_id", None), list) else set()
    record_steps = {t for t in range(args.every, args.max_new_tokens + 1, args.every)}
    record_steps |= {int(x) for x in args.extra_steps.split(",") if x.strip()}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoded_all = [encode(tok, q) for q in prompts]
    keep = [i for i, e in enumerate(encoded_all) if len(e) <= args.max_prompt_tokens]
    skipped = len(prompts) - len(keep)
    prompts = [prompts[i] for i in keep]
    encoded_all = [encoded_all[i] for i in keep]
    manifest = {
        "model_id": model_id, "hidden_size": d, "layer": -1, "tau": tap.cfg.tau,
        "prompts": args.prompts, "format": args.format, "prompts_hash": prompts_hash(prompts),
        "n_prompts": len(prompts), "skipped_long_prompts": skipped, "samples": args.samples,
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens, "every": args.every,
        "record_steps": sorted(record_steps), "seed": args.seed, "dtype": dtype, "device": device,
        "shard_size": args.shard_size, "decode_samples": args.decode_samples, "command": "lenpred collect " + " ".join(argv if argv is not None else sys.argv[1:]),
        "length_convention": "generated tokens incl. EOS; capped = hit max_new_tokens (censored)",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    n_shards = math.ceil(len(prompts) / args.shard_size)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=len(prompts), desc="collect", unit="prompt", disable=args.no_progress) if tqdm else None
    done_now = 0
    for s in range(n_shards):
        path = out / f"shard-{s:05d}.npz"
        lo, hi = s * args.shard_size, min(len(prompts), (s + 1) * args.shard_size)
        if path.exists():
            if bar:
                bar.update(hi - lo)
            continue
        if args.max_seconds is not None and time.time() - t0 > args.max_seconds:
            print(f"lenpred collect: --max-seconds reached; {s}/{n_shards} shards written, rerun to resume",
                  file=sys.stderr)
            break
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + s)
        rec = collect_shard(model, tok, tap, prompts[lo:hi], encoded_all[lo:hi], args=args,
                            record_steps=record_steps, eos=eos, gen=gen, device=device)
        tmp = out / f".shard-{s:05d}.tmp.npz"
        np.savez(tmp, **rec, meta=np.array(json.dumps({**manifest, "shard": s})))
        os.replace(tmp, path)
        done_now += hi - lo
        if bar:
            bar.update(hi - lo)
            bar.set_postfix(mean_len=f"{rec['length'].mean():.0f}", capped=f"{rec['capped'].mean():.2f}")
    if bar:
        bar.close()
    dt = time.time() - t0
    print(f"lenpred collect: {done_now} prompts x {args.samples} samples in {dt:.0f}s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

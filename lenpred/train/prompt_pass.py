"""Prompt-only transformers pass: prompt representations the engine tap does not ship.

The SGLang tap ships the entropy pool (tau=1) and the last prompt token's state, final layer. The
accuracy table also needs the mean-pool baseline and the pooling/layer ablation; those come from one
cheap forward over the prompts only (no generation), with the tap's own pooling code:

  mean               mean of every prompt position, final layer (the mean-pool baseline)
  ent_tau{2,4}       entropy pool at flatter temperatures
  ent_user[_tau2]    entropy pool over the user turn only (the chat template's shared prefix dropped)
  mean_user, max_user
  last_L{l}, mean_user_L{l}   the same at middle layers

`variants="mean"` computes only the first (what `lenpred train` needs); "ablation" all of them.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from lenpred.tap.pooling import pool_direct, token_entropy


def template_prefix_len(tok, encode) -> int:
    """Tokens the chat template puts before every user turn (shared by all prompts)."""
    from lenpred.train.prompts import Prompt

    e1 = encode(tok, Prompt("x", [{"role": "user", "content": "alpha"}], "x"))
    e2 = encode(tok, Prompt("x", [{"role": "user", "content": "omega beta"}], "x"))
    return next(i for i, (u, v) in enumerate(zip(e1, e2)) if u != v)


def default_layers(n_layers: int) -> list[int]:
    return sorted({round(n_layers * 2 / 3), n_layers // 2})


@torch.inference_mode()
def prompt_features(model, encoded: list[list[int]], *, variants: str = "mean", p0: int = 0,
                    layers: list[int] | None = None, batch_size: int = 16, device="cpu",
                    log=print) -> dict[str, np.ndarray]:
    """{name: [P, d] float16} for every prompt (token ids), in input order."""
    want_abl = variants == "ablation"
    layers = layers if layers is not None else default_layers(model.config.num_hidden_layers)
    lm = model.get_output_embeddings()
    order = np.argsort([len(e) for e in encoded], kind="stable")
    res: list[dict | None] = [None] * len(encoded)
    t0 = time.time()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = max(len(encoded[i]) for i in idx)
        inp = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for j, i in enumerate(idx):
            inp[j, L - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[j, L - len(encoded[i]):] = 1
        inp, mask = inp.to(device), mask.to(device)
        o = model.model(input_ids=inp, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                        output_hidden_states=want_abl)
        for j, i in enumerate(idx):
            n = len(encoded[i])
            h = o.last_hidden_state[j, L - n:].float()
            r = {"mean": h.mean(0)}
            if want_abl:
                H = token_entropy(lm(o.last_hidden_state[j, L - n:]))
                q = min(p0, n - 1)
                hu, Hu = h[q:], H[q:]
                r.update({"ent_tau2": pool_direct(h, H, 2.0), "ent_tau4": pool_direct(h, H, 4.0),
                          "ent_user": pool_direct(hu, Hu, 1.0), "ent_user_tau2": pool_direct(hu, Hu, 2.0),
                          "mean_user": hu.mean(0), "max_user": hu.max(0).values})
                for layer in layers:
                    hl = o.hidden_states[layer][j, L - n:].float()
                    r[f"last_L{layer}"] = hl[-1]
                    r[f"mean_user_L{layer}"] = hl[q:].mean(0)
            res[i] = {k: v.cpu().numpy().astype(np.float16) for k, v in r.items()}
        if log and s and s % (batch_size * 50) == 0:
            log(f"  prompt pass {s}/{len(encoded)} prompts, {time.time() - t0:.0f}s")
    return {k: np.stack([r[k] for r in res]) for k in res[0]} if res else {}

"""`lenpred eval --data DIR[,DIR] --heads DIR [--baselines DIR] --out DIR`: score every predictor on
held-out traces (the test split written by `lenpred train`, or all prompts with --split all) and
write report.md, report.json and plots.

Ground truth is the served length min(L, cap): with max_tokens = cap the engine stops there, so
that is what a scheduler must predict; predictions are clipped to the cap. `mae_uncapped` also
reports the error on replies that ended by themselves (true length known exactly)."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np

TOKENS = (0, 8, 16, 32, 64, 128)


def minilm_features(texts: np.ndarray) -> np.ndarray:
    from lenpred.model import cache_root
    from lenpred.train import models

    h = hashlib.sha256("\x00".join(texts.tolist()).encode()).hexdigest()[:16]
    path = cache_root() / "minilm" / f"{h}.npy"
    if path.exists():
        return np.load(path)
    emb = models.embed_minilm(list(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def features(tr, req_rows: np.ndarray, need_minilm: bool) -> dict[str, np.ndarray]:
    pr = tr.req_prompt[req_rows]
    F = {"last": tr.last[pr].astype(np.float32), "prompt_tokens": tr.prompt_tokens[pr].astype(np.float32),
         "none": np.zeros((len(pr), 1), np.float32)}
    for name in ("pooled", "mean"):
        if getattr(tr, name) is not None:
            F[name] = getattr(tr, name)[pr].astype(np.float32)
    if need_minilm:
        uniq, inv = np.unique(pr, return_inverse=True)
        F["minilm"] = minilm_features(tr.text[uniq])[inv]
    return F


def plp_rows(tr, req_rows: np.ndarray, steps=None, prompt: str = "pooled"):
    """PLP inputs [h_prompt ; h_t] and remaining-length targets: step-0 rows (h_t = the prompt's
    last-token state) for every request, then every recorded decode state of these requests.
    `prompt` picks h_prompt: the entropy pool ("pooled") or the last prompt token's state ("last").
    With `steps`, only the first state at or after each of these steps (before the next) is kept,
    and `bucket` says which step it stands for (data.step_buckets); targets use the actual step.
    Returns X, y, step, reqs, bucket."""
    from lenpred.train.data import decode_rows, step_buckets

    hp = {"pooled": tr.pooled, "last": tr.last}[prompt]
    pr = tr.req_prompt[req_rows]
    X0 = np.concatenate([hp[pr], tr.last[pr]], 1)
    y0 = tr.length[req_rows].astype(np.float32)
    d = decode_rows(tr, req_rows)
    bucket = tr.dec_step[d].astype(np.int64)
    if steps is not None:
        bucket = step_buckets(tr.dec_req[d], tr.dec_step[d], steps)
        keep = bucket >= 0
        d, bucket = d[keep], bucket[keep]
    req = tr.dec_req[d]
    X1 = np.concatenate([hp[tr.req_prompt[req]], tr.dec_vec[d]], 1)
    y1 = (tr.length[req] - tr.dec_step[d]).astype(np.float32)
    X = np.concatenate([X0, X1]).astype(np.float32)
    y = np.concatenate([y0, y1])
    step = np.concatenate([np.zeros(len(req_rows), np.int32), tr.dec_step[d]])
    reqs = np.concatenate([req_rows, req])
    return X, y, step, reqs, np.concatenate([np.zeros(len(req_rows), np.int64), bucket])


TEXT_BASELINES = ("proxy-minilm", "prompt-length", "const-median", "const-mean")


def noise_floor(tr, req_rows: np.ndarray, t: int = 64) -> dict:
    """Sampling-noise floor (docs/results/accuracy.md): predict each reply by the median length of
    the *other* samples of the same prompt — an oracle that knows the realised lengths. Also for the
    remaining length after t tokens (others still running at t: median(L) - t)."""
    by_prompt: dict[int, list[int]] = {}
    for r in req_rows:
        by_prompt.setdefault(int(tr.req_prompt[r]), []).append(int(r))
    err, err_t = [], []
    for rs in by_prompt.values():
        if len(rs) < 2:
            continue
        L = tr.length[rs].astype(np.float64)
        for i in range(len(rs)):
            others = np.delete(L, i)
            err.append(abs(np.median(others) - L[i]))
            run = others[others > t]
            if L[i] > t and len(run):
                err_t.append(abs(np.median(run) - t - (L[i] - t)))
    return {"loo_median_mae": float(np.mean(err)) if err else None, "n": len(err),
            f"loo_remaining_mae_t{t}": float(np.mean(err_t)) if err_t else None, f"n_t{t}": len(err_t),
            "note": "median of the other samples of the same prompt (needs K >= 2 samples per prompt)"}


def time_predictor(p, X: np.ndarray, batch: int, reps: int = 30) -> float:
    import torch

    xb = X[:batch]
    if len(xb) < batch:
        xb = np.resize(xb, (batch,) + X.shape[1:])
    with torch.no_grad():
        p.predict(xb)
        t = time.perf_counter()
        for _ in range(reps):
            p.predict(xb)
    return (time.perf_counter() - t) * 1e6 / reps / batch


def evaluate(tr, req_rows: np.ndarray, preds: dict, *, timing: bool = True, log=print) -> dict:
    from lenpred.train.metrics import scores

    need_minilm = any(p.input == "minilm" for p in preds.values())
    F = features(tr, req_rows, need_minilm)
    y = tr.length[req_rows].astype(np.float64)
    cap = tr.cap[req_rows]
    capped = tr.capped[req_rows]
    ds = tr.dataset[tr.req_prompt[req_rows]]
    datasets = sorted(set(ds.tolist()))
    rep = {"methods": {}, "by_dataset": {}, "plp": {}, "n_requests": int(len(req_rows)),
           "n_prompts": int(len(np.unique(tr.req_prompt[req_rows]))), "datasets": datasets}
    outputs = {}
    for name, p in preds.items():
        if p.target != "total" or p.input not in F:
            continue
        o = p.predict(F[p.input])
        outputs[name] = o
        s = scores(y, o["point"], np.minimum(o["p90"], cap) if o.get("p90") is not None else None, cap, capped)
        s["p50_mae"] = scores(y, o["p50"], None, cap)["mae"]
        s["params"] = int(p.params)
        if timing:
            s["us_per_pred_b1"] = round(time_predictor(p, F[p.input], 1), 2)
            s["us_per_pred_b256"] = round(time_predictor(p, F[p.input], 256), 3)
            if p.input == "minilm":
                s["note"] = "timing excludes the MiniLM prompt encoder (22.7M params) it needs"
        rep["methods"][name] = s
        for dname in datasets:
            m = ds == dname
            rep["by_dataset"].setdefault(dname, {})[name] = scores(
                y[m], o["point"][m], np.minimum(o["p90"][m], cap[m]), cap[m], capped[m])
    base = {k: v["mae"] for k, v in rep["methods"].items() if k not in ("egtp",)}
    if "egtp" in rep["methods"] and base:
        best = min(base, key=base.get)
        rep["egtp_vs_best_baseline"] = {"best_baseline": best, "best_baseline_mae": base[best],
                                        "egtp_mae": rep["methods"]["egtp"]["mae"],
                                        "reduction": (1 - rep["methods"]["egtp"]["mae"] / base[best]) if base[best] > 0 else float("nan")}
    # ---- the served prefill head (what `--prefill-head auto` picks: the lower MAE) vs text baselines
    served = min((k for k in ("egtp", "last-token-head") if k in rep["methods"]), default=None,
                 key=lambda k: rep["methods"][k]["mae"])
    text = {k: v["mae"] for k, v in rep["methods"].items() if k in TEXT_BASELINES}
    if served and text:
        best = min(text, key=text.get)
        rep["served_vs_text_baselines"] = {
            "served": served, "served_mae": rep["methods"][served]["mae"], "best_text_baseline": best,
            "best_text_baseline_mae": text[best],
            "reduction": 1 - rep["methods"][served]["mae"] / text[best] if text[best] > 0 else float("nan")}
    rep["noise_floor"] = noise_floor(tr, req_rows)
    # ---- PLP: remaining length vs tokens decoded, against the static EGTP prediction
    plp = [p for p in preds.values() if p.target == "remaining"]
    if plp and "egtp" in outputs:
        p = plp[0]
        X, yr, step, reqs, bucket = plp_rows(tr, req_rows, steps=[t for t in TOKENS if t > 0],
                                     prompt=p.input.split("+")[0])
        o = p.predict(X)
        pos = {int(r): i for i, r in enumerate(req_rows)}
        eg = outputs["egtp"]["point"][[pos[int(r)] for r in reqs]]
        capr = tr.cap[reqs]
        static = np.maximum(np.minimum(eg, capr) - step, 0)
        by, st, n, cov = {}, {}, {}, {}
        for t in TOKENS:
            m = bucket == t
            if not m.any():
                continue
            rem_cap = capr[m] - step[m]
            by[str(t)] = float(np.abs(np.minimum(o["point"][m], rem_cap) - yr[m]).mean())
            st[str(t)] = float(np.abs(static[m] - yr[m]).mean())
            cov[str(t)] = float((yr[m] <= np.minimum(o["p90"][m], rem_cap) + 1e-6).mean())
            n[str(t)] = int(m.sum())
        sv = outputs[served]["point"][[pos[int(r)] for r in reqs]] if served else eg
        served_static = np.maximum(np.minimum(sv, capr) - step, 0)
        sst = {str(t): float(np.abs(served_static[bucket == t] - yr[bucket == t]).mean()) for t in TOKENS if (bucket == t).any()}
        rep["plp"] = {"mae_by_tokens": by, "static_mae_by_tokens": st, "p90_coverage_by_tokens": cov,
                      "served_static": served, "served_static_mae_by_tokens": sst,
                      "ratio_to_served_static_by_tokens": {k: by[k] / sst[k] for k in by if sst.get(k)},
                      "n_by_tokens": n, "params": int(p.params),
                      "ratio_by_tokens": {k: by[k] / st[k] for k in by if st.get(k)},
                      "note": "rows at t are the requests still running after t tokens, each at its first recorded "
                              "state at or after t (the engine tap samples every k engine steps); static = "
                              "max(EGTP point - step, 0); step 0 uses [h_prompt ; h_last_prompt_token]"}
        if timing:
            rep["plp"]["us_per_pred_b1"] = round(time_predictor(p, X, 1), 2)
            rep["plp"]["us_per_pred_b256"] = round(time_predictor(p, X, 256), 3)
    rep["_outputs"] = {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in outputs.items()}
    rep["_y"] = y.tolist()
    return rep


# ------------------------------------------------------------------------------------------- report
def write_report(rep: dict, out: pathlib.Path, *, title: str, header: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pub = _finite({k: v for k, v in rep.items() if not k.startswith("_")})
    (out / "report.json").write_text(json.dumps(pub, indent=1, allow_nan=False))
    plots = _plots(rep, out)
    L = [f"# {title}", ""] + (header or [])
    L += ["", f"Held-out requests: {rep['n_requests']} ({rep['n_prompts']} prompts); ground truth = served length "
          "min(L, cap), predictions clipped to the cap. `MAE unc.` = requests that ended before the cap.", "",
          "| method | MAE | median AE | Acc-50 | Acc-100 | p90 cov. | MAE unc. | p50 MAE | params | µs/pred b1 | µs/pred b256 |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, s in sorted(rep["methods"].items(), key=lambda kv: kv[1]["mae"]):
        L.append(f"| {k} | {s['mae']:.1f} | {s['median_ae']:.1f} | {s['acc50']:.3f} | {s['acc100']:.3f} | "
                 f"{s.get('p90_coverage', float('nan')):.3f} | {s.get('mae_uncapped', float('nan')):.1f} | "
                 f"{s.get('p50_mae', float('nan')):.1f} | {s['params']:,} | {s.get('us_per_pred_b1', '')} | "
                 f"{s.get('us_per_pred_b256', '')} |")
    if "egtp_vs_best_baseline" in rep:
        e = rep["egtp_vs_best_baseline"]
        L += ["", f"EGTP vs best baseline ({e['best_baseline']}, MAE {e['best_baseline_mae']:.1f}): "
                  f"MAE {e['egtp_mae']:.1f}, i.e. {abs(100 * e['reduction']):.1f}% "
                  f"{'below' if e['reduction'] >= 0 else 'ABOVE'} it (target: ≥ 35% below)."]
    if "served_vs_text_baselines" in rep:
        e = rep["served_vs_text_baselines"]
        L += ["", f"Served prefill head ({e['served']}, MAE {e['served_mae']:.1f}) vs the best text/auxiliary baseline "
                  f"({e['best_text_baseline']}, MAE {e['best_text_baseline_mae']:.1f}): {100 * e['reduction']:.1f}% lower."]
    nf = rep.get("noise_floor") or {}
    if nf.get("loo_median_mae") is not None:
        L += ["", f"Noise floor: the median of the other samples of the same prompt scores MAE "
                  f"{nf['loo_median_mae']:.1f} ({nf['n']} replies); remaining length after 64 tokens: "
                  f"{nf.get('loo_remaining_mae_t64') or float('nan'):.1f}."]
    L += ["", "## Per dataset (MAE / Acc-100 / p90 coverage)", ""]
    names = sorted(rep["methods"], key=lambda k: rep["methods"][k]["mae"])
    L += ["| dataset | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for dname, ms in rep["by_dataset"].items():
        n = next(iter(ms.values()))["n"]
        L.append(f"| {dname} | {n} | " + " | ".join(
            f"{ms[k]['mae']:.1f} / {ms[k]['acc100']:.2f} / {ms[k].get('p90_coverage', float('nan')):.2f}" for k in names) + " |")
    if rep.get("plp"):
        p = rep["plp"]
        ks = list(p["mae_by_tokens"])
        L += ["", "## PLP: remaining-length MAE vs tokens decoded", "",
              "| tokens decoded | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
              "| requests still running | " + " | ".join(str(p["n_by_tokens"][k]) for k in ks) + " |",
              "| PLP MAE | " + " | ".join(f"{p['mae_by_tokens'][k]:.1f}" for k in ks) + " |",
              "| static (EGTP − t) MAE | " + " | ".join(f"{p['static_mae_by_tokens'][k]:.1f}" for k in ks) + " |",
              "| PLP / static | " + " | ".join(f"{p['ratio_by_tokens'].get(k, float('nan')):.2f}" for k in ks) + " |",
              f"| served static ({p.get('served_static')} − t) MAE | " + " | ".join(
                  f"{p.get('served_static_mae_by_tokens', {}).get(k, float('nan')):.1f}" for k in ks) + " |",
              "| PLP / served static | " + " | ".join(
                  f"{p.get('ratio_to_served_static_by_tokens', {}).get(k, float('nan')):.2f}" for k in ks) + " |",
              "| PLP p90 coverage | " + " | ".join(f"{p['p90_coverage_by_tokens'][k]:.2f}" for k in ks) + " |",
              "", p["note"] + "."]
    if plots:
        L += ["", "## Plots", ""] + [f"![{n}]({n})" for n in plots]
    else:
        L += ["", "(matplotlib not installed: plots skipped)"]
    (out / "report.md").write_text("\n".join(L) + "\n")


def _finite(x):
    """NaN/inf -> None so report.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _plots(rep: dict, out: pathlib.Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    ms = sorted(rep["methods"].items(), key=lambda kv: kv[1]["mae"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([k for k, _ in ms][::-1], [s["mae"] for _, s in ms][::-1], color="tab:blue")
    ax.set_xlabel("MAE (tokens), held-out prompts")
    fig.tight_layout()
    fig.savefig(out / "mae_by_method.png", dpi=110)
    plt.close(fig)
    names.append("mae_by_method.png")
    if rep.get("plp"):
        p = rep["plp"]
        ks = list(p["mae_by_tokens"])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([int(k) for k in ks], [p["mae_by_tokens"][k] for k in ks], "o-", label="PLP")
        ax.plot([int(k) for k in ks], [p["static_mae_by_tokens"][k] for k in ks], "s--", label="static EGTP − t")
        ax.set_xlabel("tokens decoded")
        ax.set_ylabel("remaining-length MAE")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "plp_mae_vs_tokens.png", dpi=110)
        plt.close(fig)
        names.append("plp_mae_vs_tokens.png")
    if "egtp" in rep.get("_outputs", {}):
        y = np.array(rep["_y"])
        pr = np.array(rep["_outputs"]["egtp"]["point"])
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(y, pr, s=3, alpha=0.3)
        ax.plot([0, y.max()], [0, y.max()], "k--", lw=1)
        ax.set_xlabel("served length")
        ax.set_ylabel("EGTP point estimate")
        fig.tight_layout()
        fig.savefig(out / "egtp_scatter.png", dpi=110)
        plt.close(fig)
        names.append("egtp_scatter.png")
    return names


def resolve_repo_path(p: str | None) -> str | None:
    """A path stored in head metadata: as is if it exists, else relative to the repository root."""
    if not p:
        return None
    if pathlib.Path(p).exists():
        return p
    q = pathlib.Path(__file__).resolve().parents[2] / p
    return str(q) if q.exists() else None


def load_predictors(heads: str, baselines: str | None, hidden_size: int, model_id: str) -> dict:
    from lenpred.train.predictors import load_dir

    preds = load_dir(heads, hidden_size, model_id)
    if baselines and pathlib.Path(baselines).is_dir():
        preds.update(load_dir(baselines, hidden_size, model_id))
    return preds


def default_baselines(heads: str) -> str:
    p = pathlib.Path(heads)
    if "sidecar/heads" in p.resolve().as_posix():
        return str(pathlib.Path(__file__).resolve().parent / "baselines" / p.name)
    return str(p / "baselines")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred eval", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--heads", required=True)
    ap.add_argument("--baselines", default=None, help="default: the train command's baseline folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="auto", help="test (needs --split-file), all, or auto")
    ap.add_argument("--split-file", default=None, help="split.json written by `lenpred train`")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from lenpred.train.data import load, request_rows

    tr = load(a.data)
    try:
        preds = load_predictors(a.heads, a.baselines or default_baselines(a.heads), tr.hidden_size, tr.model_id)
    except (ValueError, FileNotFoundError) as e:
        print(f"lenpred eval: {e}", file=sys.stderr)
        return 2
    split_file = a.split_file
    if split_file is None and a.split != "all":
        eg = preds.get("egtp")
        cand = eg.meta.get("trained", {}).get("split_file") if eg else None
        if cand:
            cand = resolve_repo_path(cand)
            split_file = cand if cand and pathlib.Path(cand).exists() else None
    if a.split == "test" or (a.split == "auto" and split_file):
        if not split_file:
            print("lenpred eval: --split test needs --split-file", file=sys.stderr)
            return 2
        test_keys = set(json.loads(pathlib.Path(split_file).read_text())["test"])
        prompt_rows = np.nonzero(np.isin(tr.key, list(test_keys)))[0]
        which = f"test split of {split_file}"
    else:
        prompt_rows = np.arange(len(tr.key))
        which = "all prompts"
    rows = request_rows(tr, prompt_rows)
    rep = evaluate(tr, rows, preds, timing=not a.no_timing)
    rep["data_hash"] = tr.data_hash
    rep["evaluated_on"] = which
    rep["command"] = "lenpred eval " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(rep, pathlib.Path(a.out), title="Length prediction — evaluation",
                 header=[f"Data: `{a.data}` (hash {tr.data_hash}), {which}.", f"Command: `{rep['command']}`"])
    print(json.dumps({k: {"mae": round(v["mae"], 1), "p90": round(v.get("p90_coverage", 0), 3)} for k, v in rep["methods"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`lenpred bench accuracy --prompts FILE --json OUT`: collect traces for FILE with the shipped
model (SmolLM2-135M-Instruct, through the tap code) and score every shipped predictor on them.
`--data DIR` scores traces collected already (e.g. on a GPU with `lenpred collect-sglang`) on the
test split the heads were trained with, and adds the pooling/layer ablation when the traces carry
its prompt representations (`--prompt-pass ablation`); `--model` picks another engine model.

Writes OUT (JSON: {"methods": {name: {mae, median_ae, acc50, acc100, p90_coverage, params,
us_per_pred_b1, ...}}, "plp": {"mae_by_tokens": {...}}, ...}), OUT with .md (markdown) and plots
beside it. Prompts that the shipped heads were trained or calibrated on (their split file) are
left out, so the numbers are held-out. Collection is cached/resumable under --work.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench accuracy", description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=None, help="prompt file to collect (or --data)")
    ap.add_argument("--data", default=None, help="score existing traces instead of collecting")
    ap.add_argument("--model", default=None, help="engine model for collection (known name, .gguf, HF folder)")
    ap.add_argument("--ablation-epochs", type=int, default=25)
    ap.add_argument("--json", required=True)
    ap.add_argument("--format", default="auto")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=512, help="keep equal to the heads' training cap")
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", default=None, help="default: sidecar/heads/smollm2-135m-instruct")
    ap.add_argument("--baselines", default=None, help="default: lenpred/train/baselines/smollm2-135m-instruct")
    ap.add_argument("--work", default=None, help="collection cache (default: runs/bench-accuracy/<file>-<args>)")
    ap.add_argument("--include-train-prompts", action="store_true", help="don't drop the heads' train/val prompts")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import numpy as np

    from lenpred.train import collect
    from lenpred.train.evaluate import default_baselines
    from lenpred.train.data import load, request_rows
    from lenpred.train.evaluate import evaluate, load_predictors, write_report
    from lenpred.train.prompts import PromptFileError, load_prompts

    root = pathlib.Path(__file__).resolve().parents[1]
    heads = a.heads or str(root / "sidecar" / "heads" / "smollm2-135m-instruct")
    bdir = a.baselines or default_baselines(heads)
    if bool(a.prompts) == bool(a.data):
        print("lenpred bench accuracy: pass --prompts (collect) or --data (existing traces)", file=sys.stderr)
        return 2
    if a.data:
        return score_traces(a, heads, bdir, argv)
    try:
        load_prompts(a.prompts, a.format, limit=1)
    except PromptFileError as e:
        print(f"lenpred bench accuracy: {e}", file=sys.stderr)
        return 2
    stem = pathlib.Path(a.prompts).stem
    work = pathlib.Path(a.work or f"runs/bench-accuracy/{stem}-o{a.offset}-n{a.limit}-k{a.samples}-t{a.temperature}"
                                  f"-m{a.max_new_tokens}-s{a.seed}")
    cargs = ["--prompts", a.prompts, "--format", a.format, "--out", str(work), "--samples", str(a.samples),
             "--temperature", str(a.temperature), "--top-p", str(a.top_p), "--max-new-tokens", str(a.max_new_tokens),
             "--every", str(a.every), "--extra-steps", "8,16", "--seed", str(a.seed), "--device", a.device,
             "--batch-size", str(a.batch_size), "--threads", str(a.threads), "--offset", str(a.offset)]
    if a.limit:
        cargs += ["--limit", str(a.limit)]
    if a.model:
        cargs += ["--model", a.model]
    rc = collect.main(cargs)
    if rc:
        return rc
    tr = load(str(work))
    try:
        preds = load_predictors(heads, bdir, tr.hidden_size, tr.model_id)
    except (ValueError, FileNotFoundError) as e:
        print(f"lenpred bench accuracy: {e}", file=sys.stderr)
        return 2
    prompt_rows = np.arange(len(tr.key))
    dropped = 0
    eg = preds.get("egtp")
    from lenpred.train.evaluate import resolve_repo_path

    split_file = resolve_repo_path(eg.meta.get("trained", {}).get("split_file")) if eg else None
    if not a.include_train_prompts and split_file and pathlib.Path(split_file).exists():
        sp = json.loads(pathlib.Path(split_file).read_text())
        seen = set(sp.get("train", [])) | set(sp.get("val", []))
        keep = ~np.isin(tr.key, list(seen))
        dropped = int((~keep).sum())
        prompt_rows = np.nonzero(keep)[0]
    if len(prompt_rows) == 0:
        print("lenpred bench accuracy: every prompt was in the heads' training data; use --offset or "
              "--include-train-prompts", file=sys.stderr)
        return 2
    rep = evaluate(tr, request_rows(tr, prompt_rows), preds)
    cmd = "lenpred bench accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    rep.update({"command": cmd, "prompts": a.prompts, "data_hash": tr.data_hash, "collection": str(work),
                "dropped_training_prompts": dropped, "heads": heads, "baselines": bdir,
                "head_versions": {k: p.meta.get("version") for k, p in preds.items() if p.meta.get("version")}})
    publish(rep, a.json, stem, cmd, [f"Traces: `{work}` (hash {tr.data_hash}); {dropped} prompts seen in "
                                     "training/calibration left out."])
    return 0


def score_traces(a, heads: str, bdir: str, argv) -> int:
    """--data: the heads' test split of existing traces, every predictor, ablation, noise floor."""
    import numpy as np

    from lenpred.train.ablate import ablation_scores
    from lenpred.train.data import load, request_rows
    from lenpred.train.evaluate import evaluate, load_predictors, resolve_repo_path

    tr = load(a.data)
    try:
        preds = load_predictors(heads, bdir, tr.hidden_size, tr.model_id)
    except (ValueError, FileNotFoundError) as e:
        print(f"lenpred bench accuracy: {e}", file=sys.stderr)
        return 2
    eg = preds.get("egtp") or preds.get("last-token-head")
    split_file = resolve_repo_path(eg.meta.get("trained", {}).get("split_file")) if eg else None
    if not split_file:
        print("lenpred bench accuracy: the heads name no split file; cannot pick held-out prompts", file=sys.stderr)
        return 2
    sp = json.loads(pathlib.Path(split_file).read_text())
    rows = {k: request_rows(tr, np.nonzero(np.isin(tr.key, sp[k]))[0]) for k in ("train", "val", "test")}
    rep = evaluate(tr, rows["test"], preds)
    cmd = "lenpred bench accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    rep.update({"command": cmd, "data": a.data, "data_hash": tr.data_hash, "split_file": split_file,
                "heads": heads, "baselines": bdir, "model_id": tr.model_id, "collection": tr.manifests,
                "head_versions": {k: p.meta.get("version") for k, p in preds.items() if p.meta.get("version")}})
    variants = {"ent_tau1 (tap, shipped EGTP input)": tr.pooled, "last (tap)": tr.last, "mean": tr.mean,
                **(tr.abl or {})}
    variants = {k: v for k, v in variants.items() if v is not None}
    if tr.abl:
        rep["pooling_ablation"] = ablation_scores(tr, rows, variants, epochs=a.ablation_epochs, log=print)
    publish(rep, a.json, pathlib.Path(a.data.split(",")[0]).name, cmd,
            [f"Traces: `{a.data}` (hash {tr.data_hash}), test split of `{split_file}`."])
    return 0


def publish(rep: dict, json_path: str, stem: str, cmd: str, header: list[str]) -> None:
    from lenpred.train.evaluate import write_report

    out = pathlib.Path(json_path)
    pdir = out.with_suffix("")
    pdir = pdir.parent / (pdir.name + "-files")
    abl = rep.get("pooling_ablation")
    if abl:
        header = header + ["", "Pooling / layer ablation (seed A's head on each prompt representation, same split; "
                           "test MAE): " + ", ".join(f"{k} {v['test_mae']:.1f}" for k, v in
                                                     sorted(abl.items(), key=lambda kv: kv[1]["test_mae"]))]
    write_report(rep, pdir, title=f"Length prediction accuracy — {stem}", header=[f"Command: `{cmd}`", *header])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text((pdir / "report.json").read_text())
    md = (pdir / "report.md").read_text().replace("](", f"]({pdir.name}/")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())

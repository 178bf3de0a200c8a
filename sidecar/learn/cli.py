"""`lenpred learn`: the operator surface of online learning.

  lenpred learn status  --dir DIR                      models, recorded requests, serving version, metrics
  lenpred learn export  --dir DIR --model M --out D    recorded dataset -> a folder `lenpred train --data D` reads
  lenpred learn import  --dir DIR --data D             collected shards (`lenpred collect[-sglang]`) -> the store
  lenpred learn disable --dir DIR --model M [--revert] kill switch: stop recording and learning (and serve
                                                       no learned head with --revert); `enable` undoes it
  lenpred learn run     --dir DIR | --config-json J    the learner process (the sidecar starts it itself)
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import sys
import time

import numpy as np

from lenpred.sidecar.learn.config import LearnConfig
from lenpred.sidecar.learn.store import ModelStore


def _status(a) -> int:
    rows = []
    for st in ModelStore.all(a.dir):
        state, sv = st.read("state.json") or {}, st.read("serving.json") or {}
        rows.append({"model": st.model_id, "folder": st.dir.name, "enabled": st.enabled(),
                     "stored_requests": st.n_requests(), "bytes": st.bytes_on_disk(),
                     "by_split": state.get("by_split"), "serving": sv.get("version"),
                     "serving_test_mae": (sv.get("metrics") or {}).get("test_mae"),
                     "serving_test_p90_coverage": (sv.get("metrics") or {}).get("test_p90_coverage"),
                     "calibration_seq": sv.get("calibration_seq"), "promotions": len(state.get("promotions", [])),
                     "rejected": state.get("rejected", 0),
                     "last_rejection": (state.get("rejections") or [{}])[-1].get("reason"),
                     "learner_updated_s_ago": round(time.time() - state["updated"], 1) if state.get("updated") else None})
    print(json.dumps(rows, indent=1))
    return 0


def _export(a) -> int:
    st = ModelStore.find(a.dir, a.model)
    out = pathlib.Path(a.out)
    if out.exists() and any(out.iterdir()):
        print(f"lenpred learn export: {out} is not empty", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    files = st.segment_files()
    for i, f in enumerate(files):  # `lenpred collect` shard names, so `lenpred train --data OUT` reads them
        shutil.copy(f, out / f"shard-{i:05d}.npz")
    (out / "manifest.json").write_text(json.dumps({"model_id": st.model_id, "hidden_size": st.hidden_size,
                                                   "layer": st.layer, "source": str(st.dir), "shards": len(files),
                                                   "requests": st.n_requests(), "exported": time.time()}))
    print(json.dumps({"out": str(out), "shards": len(files), "requests": st.n_requests()}))
    return 0


def _import(a) -> int:
    from lenpred.sidecar.learn.split import split_group
    from lenpred.sidecar.learn.store import Example
    from lenpred.train.data import load

    tr = load(a.data)
    st = ModelStore(a.dir, a.model_id or tr.model_id, tr.hidden_size, -1).ensure()
    cfg = LearnConfig(dir=a.dir)
    exs = []
    ts = time.time()
    order = np.argsort(tr.finish_seq, kind="stable") if tr.finish_seq is not None else np.arange(len(tr.length))
    dec_by_req: dict[int, list[int]] = {}
    for j, r in enumerate(tr.dec_req):
        dec_by_req.setdefault(int(r), []).append(j)
    for n, r in enumerate(order):
        p = tr.req_prompt[r]
        js = sorted(dec_by_req.get(int(r), []), key=lambda j: tr.dec_step[j])
        exs.append(Example(rid=f"import:{tr.key[p]}#{n}", group=split_group(int(tr.prompt_tokens[p]), tr.last[p],
                                                                         cfg.simhash_bits),
                           prompt_tokens=int(tr.prompt_tokens[p]), last=tr.last[p],
                           pooled=None if tr.pooled is None else tr.pooled[p], length=int(tr.length[r]),
                           capped=bool(tr.capped[r]), cap=int(tr.cap[r]), finish_ts=ts + n * 1e-6,
                           dec_steps=[int(tr.dec_step[j]) for j in js], dec_vecs=[tr.dec_vec[j] for j in js]))
    for s in range(0, len(exs), 1024):
        st.write_segment(exs[s:s + 1024])
    print(json.dumps({"model": st.model_id, "folder": st.dir.name, "imported_requests": len(exs),
                      "stored_requests": st.n_requests()}))
    return 0


def _switch(a, enabled: bool) -> int:
    st = ModelStore.find(a.dir, a.model)
    st.write("control.json", {"enabled": enabled, "revert": bool(getattr(a, "revert", False)) and not enabled,
                              "changed": time.time()})
    print(json.dumps({"model": st.model_id, "enabled": enabled}))
    return 0


def _run(a) -> int:
    from lenpred.sidecar.learn.learner import run

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s learner %(levelname)s %(message)s")
    cfg = LearnConfig.model_validate_json(a.config_json) if a.config_json else LearnConfig(dir=a.dir)
    return run(cfg, once=a.once)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred learn", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status")
    p.add_argument("--dir", required=True)
    p = sub.add_parser("export")
    p.add_argument("--dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("import")
    p.add_argument("--dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--model-id", default=None, help="store under this id (default: the traces' model id)")
    for name in ("disable", "enable"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--model", required=True)
        if name == "disable":
            p.add_argument("--revert", action="store_true", help="also stop serving the learned heads")
    p = sub.add_parser("run")
    p.add_argument("--dir", default=None)
    p.add_argument("--config-json", default=None)
    p.add_argument("--once", action="store_true")
    p.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    if a.cmd == "run" and not (a.dir or a.config_json):
        ap.error("run needs --dir or --config-json")
    try:
        return {"status": _status, "export": _export, "import": _import, "run": _run,
                "disable": lambda a: _switch(a, False), "enable": lambda a: _switch(a, True)}[a.cmd](a)
    except LookupError as e:
        print(f"lenpred learn: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

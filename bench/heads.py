"""Head speed at realistic widths: `python -m lenpred.bench.heads [--json OUT]`.

Random-weight EGTP heads at d (default 4096) and PLP heads at 2d (input [h_prompt; h_t] = 8192),
forward + softmax + point estimate + p50/p90 (LengthHead.predict), batch 1/32/256, on CUDA when
present (CUDA events, after warm-up) else CPU. Reports µs per call and µs per prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def time_head(head, batch: int, device: str, dtype, iters: int = 200) -> float:
    import torch

    x = torch.randn(batch, head.meta.input_dim, device=device, dtype=dtype)
    for _ in range(20):
        head.predict(x)
    if device == "cuda":
        torch.cuda.synchronize()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(iters):
            head.predict(x)
        t1.record()
        torch.cuda.synchronize()
        return t0.elapsed_time(t1) * 1000 / iters
    t = time.perf_counter()
    for _ in range(iters):
        head.predict(x)
    return (time.perf_counter() - t) * 1e6 / iters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lenpred bench heads")
    ap.add_argument("--hidden", type=int, nargs="+", default=[576, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    from lenpred.sidecar.heads import random_head

    torch.set_num_threads(a.threads)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    dtypes = {"float32": [torch.float32], "bfloat16": [torch.bfloat16]}.get(a.dtype, [torch.float32, torch.bfloat16] if dev == "cuda" else [torch.float32])
    rows = []
    for d in a.hidden:
        for kind in ("egtp", "plp"):
            for dt in dtypes:
                head = random_head(kind, d).to(dev)
                head.net.to(dt)  # bin edges/centres stay float32, as in the sidecar
                params = sum(p.numel() for p in head.parameters())
                for b in a.batches:
                    us = time_head(head, b, dev, dt, a.iters)
                    rows.append({"kind": kind, "hidden": d, "input_dim": head.meta.input_dim, "params": params,
                                 "dtype": str(dt).replace("torch.", ""), "batch": b, "us_per_call": round(us, 2),
                                 "us_per_pred": round(us / b, 3)})
                    print(f"{kind:4s} d={d:5d} in={head.meta.input_dim:5d} {rows[-1]['dtype']:8s} params={params/1e6:6.2f}M "
                          f"batch={b:4d}  {us:9.1f} µs/call  {us / b:8.2f} µs/pred", flush=True)
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    rep = {"device": dev_name, "torch": torch.__version__, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

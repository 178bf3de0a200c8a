"""`lenpred bench <name>`: one command per headline number; each writes markdown + JSON."""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "accuracy": ("lenpred.bench.accuracy", "prediction accuracy of every shipped predictor on a prompt file"),
    "learn": ("lenpred.bench.learn", "online learning replayed through a real sidecar: served MAE vs finished requests"),
    "heads": ("lenpred.bench.heads", "head forward time at realistic widths"),
    "sidecar": ("lenpred.bench.sidecar", "sidecar throughput and latency over real gRPC"),
    "tapcheck": ("lenpred.bench.tapcheck", "tap vectors under CUDA graphs vs without, on real SGLang"),
    "engine": ("lenpred.bench.engine", "the tap's cost inside real SGLang: vanilla vs tap variants, interleaved"),
    "entropy": ("lenpred.bench.entropy_cost", "prompt-token entropy: cost and cheaper approximations"),
    "schedule": ("lenpred.bench.schedule", "router policies replayed on real length traces"),
    "schedule-real": ("lenpred.bench.real.cli", "router policies on real SGLang replicas (injected predictions)"),
    "router": ("lenpred.bench.router_overhead", "router overhead in front of fast stub backends"),
    "queue": ("lenpred.bench.queue", "router queue cost with 10k requests waiting (heap vs re-sorted list)"),
    "soak": ("lenpred.bench.soak", "N minutes through router + sidecar + Redis: RSS and Redis keys over time"),
    "crosscheck": ("lenpred.bench.crosscheck", "the same workload on real SGLang replicas and on the emulator"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lenpred bench <name> [options]\n")
        for k, (_, d) in BENCHES.items():
            print(f"  {k:<10} {d}")
        return 0
    if argv[0] not in BENCHES:
        print(f"lenpred bench: unknown benchmark {argv[0]!r}; one of {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(BENCHES[argv[0]][0])
    except ModuleNotFoundError as e:
        print(f"lenpred bench {argv[0]}: not available in this build ({e})", file=sys.stderr)
        return 2
    return int(mod.main(argv[1:]) or 0)

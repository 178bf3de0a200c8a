"""The `lenpred` command: one entry for every part of the spine.

Each subcommand lives with its component and is imported lazily, so `lenpred router` never
pays for torch and `lenpred sidecar` never imports the router.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("lenpred.harness.demo", "end-to-end demo: Redis + sidecar + SGLang with the tap + router, real prompts"),
    "sidecar": ("lenpred.sidecar.cli", "run the gRPC prediction sidecar"),
    "router": ("lenpred.router.cli", "run the OpenAI-compatible router (serve) or check a policy file (validate)"),
    "engine": ("lenpred.harness.engine", "run one real SGLang replica on CPU with the tap (dev/test launcher)"),
    "emulator": ("lenpred.harness.emulator", "run an engine emulator speaking SGLang's HTTP API (benchmarks)"),
    "collect": ("lenpred.train.collect", "collect length traces from the real model through the tap code"),
    "collect-sglang": ("lenpred.train.collect_sglang", "collect length traces from real SGLang serving with the tap (GPU path)"),
    "learn": ("lenpred.sidecar.learn.cli", "online learning: learner process, recorded datasets, kill switch"),
    "train": ("lenpred.train.train", "train EGTP/PLP heads and baselines"),
    "eval": ("lenpred.train.evaluate", "evaluate predictors on held-out traces"),
    "bench": ("lenpred.bench.cli", "benchmarks: accuracy, schedule, sidecar, router, tap"),
}


def usage() -> str:
    lines = ["usage: lenpred <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"lenpred: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(COMMANDS[cmd][0])
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Shared output for benchmarks: one JSON file and one markdown table per run."""
from __future__ import annotations

import json
import pathlib
import platform
import time


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu_count": __import__("os").cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write(result: dict, json_path: str | None, md_path: str | None, md: str) -> None:
    if json_path:
        p = pathlib.Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2))
    if md_path:
        p = pathlib.Path(md_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(md)
    print(md)

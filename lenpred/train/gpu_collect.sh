#!/bin/bash
# GPU machine (one H200, gpu-kit environment): collect SmolLM2-135M and Qwen2.5-Coder-0.5B traces
# with real SGLang 0.5.23 (CUDA graphs) + the lenpred tap, both servers side by side on the GPU.
#
#   bash lenpred/train/gpu_collect.sh carry DIR # DEV BOX: the prompt subset + Qwen tokenizer files (13 MB) to carry
#   bash lenpred/train/gpu_collect.sh split-gguf DIR  # DEV BOX: the joined Qwen GGUF in 60 MiB pieces (one per call)
#   bash lenpred/train/gpu_collect.sh join DIR  # GPU: pieces (in name order) -> $QWEN_GGUF, size + sha256 checked
#   bash lenpred/train/gpu_collect.sh prep      # once: Qwen GGUF -> bf16 HF checkpoint (~1 min)
#   bash lenpred/train/gpu_collect.sh collect   # both models, ~4.5 min wall (GEN_S generation each)
#        smoke first: LIMIT=32 GEN_S=20 TRACES=/root/smoke bash lenpred/train/gpu_collect.sh collect  (~2 min)
#   bash lenpred/train/gpu_collect.sh ship N    # copy the N-th batch of <= 7 shard files (+ manifest) to $OUT
#   bash lenpred/train/gpu_collect.sh unship FILES DEST  # DEV BOX: shipped files -> DEST/{smollm2,qwen}/shard-*.npz
#
# Needs: lenpred installed in $SITE (gpu-kit install.sh with a wheel of this branch), the sm90 shim as
# sitecustomize.py in $SHIM, SmolLM2 converted at $SMOL (gpu-kit convert.sh), the joined Qwen GGUF at
# $QWEN_GGUF and the tokenizer files made on the dev box in $QWEN_TOK, the prompt subset at $PROMPTS
# (python -m lenpred.train.prepare_prompts --out ...). Output: $TRACES/{smollm2,qwen}/shard-*.npz
# (<= 14 MiB each) + manifest.json + sglang.log.
set -euo pipefail
SITE=${SITE:-/root/site}; SHIM=${SHIM:-/root/shim}; PY=${PY:-python3}
SMOL=${SMOL:-/root/smol}; QWEN=${QWEN:-/root/qwen}; QWEN_GGUF=${QWEN_GGUF:-/root/xfer/qwen.gguf}
QWEN_TOK=${QWEN_TOK:-$PWD/runs/carry/qwen-tok}; PROMPTS=${PROMPTS:-$PWD/runs/carry/prompts.jsonl}
TRACES=${TRACES:-/root/traces}; GEN_S=${GEN_S:-150}; CONC=${CONC:-256}
export PYTHONPATH=$SHIM:$SITE${PYTHONPATH:+:$PYTHONPATH}
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
C="$PY -m lenpred.cli collect-sglang --prompts $PROMPTS --samples 4 --temperature 0.7 --top-p 0.95 --max-new-tokens 512 \
   --max-prompt-tokens 1024 --every 8 --keep-steps 8,16,32,64,128,256 --stride 128 --decode-samples 2 \
   --concurrency $CONC --max-seconds $GEN_S --mem-fraction 0.35 --shard-mib 14 --device cuda ${LIMIT:+--limit $LIMIT}"
case "${1:-}" in
  carry)
    d=${2:?folder}; mkdir -p "$d/qwen-tok"
    $PY -m lenpred.train.prepare_prompts --out "$d/prompts.jsonl"
    q=$($PY -c "from lenpred.model import hf_checkpoint; print(hf_checkpoint(name='qwen2.5-coder-0.5b-instruct'))")
    cp "$q"/tokenizer.json "$q"/tokenizer_config.json "$q"/chat_template.jinja "$q"/generation_config.json "$d/qwen-tok/"
    du -sh "$d"
    ;;
  split-gguf)
    d=${2:?folder}; mkdir -p "$d"
    g=$($PY -c "from lenpred.model import gguf_path; print(gguf_path('qwen2.5-coder-0.5b-instruct'))")
    split -b 60M -d -a 2 "$g" "$d/qwen.gguf.part-" && ls -l "$d"
    ;;
  join)
    d=${2:?folder}; cat $(ls "$d"/qwen.gguf.part-* | sort) > "$QWEN_GGUF"
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $QWEN_GGUF" | sha256sum -c - \
      && [ "$(stat -c %s "$QWEN_GGUF")" = 491400064 ] || { echo "JOIN: Qwen GGUF incomplete or corrupt"; exit 1; }
    ;;
  prep)
    $PY -m lenpred.model.convert "$QWEN_GGUF" "$QWEN" --model-id Qwen/Qwen2.5-Coder-0.5B-Instruct --tokenizer-from "$QWEN_TOK"
    ;;
  collect)
    mkdir -p "$TRACES"
    t0=$(date +%s)
    $C --model "$SMOL" --prompt-pass none --port 30123 --out "$TRACES/smollm2" > "$TRACES/smollm2.log" 2>&1 &
    a=$!
    $C --model "$QWEN" --prompt-pass ablation --prompt-batch 64 --port 30124 --out "$TRACES/qwen" > "$TRACES/qwen.log" 2>&1 &
    b=$!
    ra=0; rb=0; wait $a || ra=$?; wait $b || rb=$?
    tail -2 "$TRACES/smollm2.log" "$TRACES/qwen.log"
    echo "collect: smollm2 rc=$ra qwen rc=$rb in $(( $(date +%s) - t0 ))s"; du -sh "$TRACES"/*
    ;;
  ship)
    # batch N (0-based) of all shards, 7 per call, plus both manifests: <= 8 files of <= 16 MiB each
    n=${2:?batch number}; out=${OUT:?OUT not set}
    mapfile -t all < <(ls "$TRACES"/smollm2/shard-*.npz "$TRACES"/qwen/shard-*.npz)
    for f in "${all[@]:$((n * 7)):7}"; do cp "$f" "$out/$(basename "$(dirname "$f")")-$(basename "$f")"; done
    [ "$n" = 0 ] && for m in smollm2 qwen; do cp "$TRACES/$m/manifest.json" "$out/$m-manifest.json"; done || true
    echo "ship $n: $(ls "$out" | wc -l) files; ${#all[@]} shards in total ($(( (${#all[@]} + 6) / 7 )) batches)"
    ;;
  unship)
    src=${2:?files folder}; dest=${3:?destination}
    for m in smollm2 qwen; do
      mkdir -p "$dest/$m"
      for f in "$src"/$m-shard-*.npz; do [ -e "$f" ] && cp "$f" "$dest/$m/${f##*/$m-}"; done
      [ -e "$src/$m-manifest.json" ] && cp "$src/$m-manifest.json" "$dest/$m/manifest.json"
    done
    ls -l "$dest"/*
    ;;
  *) echo "usage: $0 carry DIR | split-gguf DIR | join DIR | prep | collect | ship N | unship FILES DEST" >&2; exit 2 ;;
esac

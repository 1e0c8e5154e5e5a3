#!/usr/bin/env bash
# Issue 2 GPU check: the studio engine on both GPU paths beside the seed's anchor recipes, same card, same call.
# Run on the device machine from the repo root after `source .whl/device_setup.sh`.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
ARCH=${ARCH:-qwen2.5-3b}; SEQ=${SEQ:-1024}
for p in standard unsloth; do
  timeout 240 python3 .whl/anchor_kto.py --path $p --arch $ARCH --seq $SEQ --bs 2 --cap-gib 7.5 2>>"$OUT/stderr.log" | grep RESULT | tee -a "$OUT/results.jsonl"
done
for b in bnb unsloth; do
  timeout 240 python3 bench/engine_gpu.py --arch $ARCH --backend $b --seq $SEQ --bs 2 --cap-gib 7.5 2>>"$OUT/stderr.log" | grep RESULT | tee -a "$OUT/results.jsonl"
done

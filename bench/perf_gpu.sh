#!/usr/bin/env bash
# Issue 8 on the device machine: the studio engine beside the seed's Unsloth+TRL recipe (.whl/anchor_kto.py, a copy
# of ../shared/bench/anchor_kto.py), same card, same call, one configuration per process, 7.5 GiB allocator cap.
#   bash bench/perf_gpu.sh same       # Qwen2.5-3B and Mistral-7B, seq 1024 and 2048, batch 2: tok/s and peak
#   bash bench/perf_gpu.sh capacity   # Mistral-7B seq 8192 and Llama-3.1-8B seq 4096, batch 2, gradients one row at a time
# Run from the repo root after `source .whl/device_setup.sh`. Results: $OUT/perf_<mode>.jsonl (RESULT lines).
set -u
MODE=${1:-same}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ANCHOR=${ANCHOR:-.whl/anchor_kto.py}
LOG="$OUT/perf_$MODE.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/card.txt"
build() { python3 -c "import sys; sys.path.insert(0, '.'); from bench.random_models import make_model_dir as m; [m(a) for a in sys.argv[1:]]" "$@"; }
anchor() { timeout 420 python3 "$ANCHOR" --path unsloth --cap-gib 7.5 "$@" 2>>"$OUT/perf_stderr.log" | grep RESULT \
             | sed 's/^RESULT {/RESULT {"recipe": "anchor-unsloth", /' | tee -a "$LOG"; }
studio() { timeout 420 python3 bench/engine_gpu.py --backend unsloth --cap-gib 7.5 "$@" 2>>"$OUT/perf_stderr.log" | grep RESULT \
             | sed 's/^RESULT {/RESULT {"recipe": "studio-unsloth", /' | tee -a "$LOG"; }
if [ "$MODE" = same ]; then
  build qwen2.5-3b & build mistral-7b & wait
  # the checkpoints are built by bench/random_models.py first, so the anchor reuses them with the fixed tokenizer
  # (its own builder's word-level tokenizer turns every qwen2 row into one token under transformers 5)
  for cfg in "qwen2.5-3b 1024" "qwen2.5-3b 2048" "mistral-7b 1024" "mistral-7b 2048"; do
    set -- $cfg
    anchor --arch "$1" --seq "$2" --bs 2
    studio --arch "$1" --seq "$2" --bs 2
  done
elif [ "$MODE" = capacity ]; then
  build mistral-7b & build llama3.1-8b & wait
  anchor --arch mistral-7b --seq 8192 --bs 2 --steps 4 --warmup 2
  studio --arch mistral-7b --seq 8192 --bs 2 --steps 4 --warmup 2 --set memory.micro_batch_size=1
  anchor --arch llama3.1-8b --seq 4096 --bs 2 --steps 4 --warmup 2
  studio --arch llama3.1-8b --seq 4096 --bs 2 --steps 4 --warmup 2 --set memory.micro_batch_size=1
fi

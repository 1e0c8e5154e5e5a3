#!/usr/bin/env bash
# Issue 8 on the device machine: the studio engine beside the seed's Unsloth+TRL recipe (.whl/anchor_kto.py, a copy
# of ../shared/bench/anchor_kto.py), same card, same call, one configuration per process, 7.5 GiB allocator cap.
#   bash bench/perf_gpu.sh same       # Qwen2.5-3B and Mistral-7B, seq 1024 and 2048, batch 2: tok/s and peak
#   ROWS="4 8" bash bench/perf_gpu.sh same   # also with those rows per precompute pass
#   CONFIGS="mistral-7b:1024" bash bench/perf_gpu.sh same   # only these (arch:seq), e.g. to repeat one for noise
#   PARITY=0 ...                      # skip the run of TRL's plain step (reference passes inside each step)
#   STEPS=20 ...                      # timed steps per run (default 8, after 3 warm-up steps), for a steadier median
#   bash bench/perf_gpu.sh probe      # no-gradient passes: extra memory and tok/s by rows per pass (forward_mem.py)
#   bash bench/perf_gpu.sh capacity   # Mistral-7B seq 8192 and Llama-3.1-8B seq 4096, batch 2, gradients one row at a time
# Run from the repo root after `source .whl/device_setup.sh`. Results: $OUT/perf_<mode>.jsonl (RESULT lines).
set -u
MODE=${1:-same}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ANCHOR=${ANCHOR:-.whl/anchor_kto.py}
LOG="$OUT/perf_$MODE.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/card.txt"
build() { python3 -c "import sys; sys.path.insert(0, '.'); from bench.random_models import make_model_dir as m; [m(a) for a in sys.argv[1:]]" "$@"; }
anchor() { timeout 420 python3 "$ANCHOR" --path unsloth --cap-gib 7.5 ${STEPS:+--steps $STEPS} "$@" 2>>"$OUT/perf_stderr.log" | grep RESULT \
             | sed 's/^RESULT {/RESULT {"recipe": "anchor-unsloth", /' | tee -a "$LOG"; }
studio() { timeout 420 python3 bench/engine_gpu.py --backend unsloth --cap-gib 7.5 ${STEPS:+--steps $STEPS} "$@" 2>>"$OUT/perf_stderr.log" | grep RESULT \
             | sed 's/^RESULT {/RESULT {"recipe": "studio-unsloth", /' | tee -a "$LOG"; }
if [ "$MODE" = same ]; then
  build qwen2.5-3b & build mistral-7b & wait
  # the checkpoints are built by bench/random_models.py first, so the anchor reuses them with the fixed tokenizer
  # (its own builder's word-level tokenizer turns every qwen2 row into one token under transformers 5)
  for cfg in ${CONFIGS:-qwen2.5-3b:1024 qwen2.5-3b:2048 mistral-7b:1024 mistral-7b:2048}; do
    set -- ${cfg/:/ }
    anchor --arch "$1" --seq "$2" --bs 2
    # TRL's own step on the same batches (reference passes inside every step): the parity check
    [ "${PARITY:-1}" = 1 ] && studio --arch "$1" --seq "$2" --bs 2 --set kto.precompute_ref_log_probs=false
    # the engine's defaults over one epoch: reference log-probs precomputed, rows per pass from the estimate
    studio --arch "$1" --seq "$2" --bs 2 --one-epoch
    for r in ${ROWS:-}; do  # explicit rows per precompute pass, to calibrate 'auto'
      studio --arch "$1" --seq "$2" --bs 2 --one-epoch --set kto.precompute_ref_batch_size=$r
    done
  done
elif [ "$MODE" = probe ]; then
  # memory and speed of the no-gradient passes by rows per pass (calibrates studio.training.memory.forward_rows)
  build qwen2.5-3b & build mistral-7b & wait
  for arch in qwen2.5-3b mistral-7b; do
    timeout 300 python3 bench/forward_mem.py --arch $arch --seqs 1024 2048 4096 --rows 1 2 4 8 16 \
      2>>"$OUT/perf_stderr.log" | grep RESULT | tee -a "$LOG"
  done
elif [ "$MODE" = capacity ]; then
  build mistral-7b & build llama3.1-8b & wait
  anchor --arch mistral-7b --seq 8192 --bs 2 --steps 4 --warmup 2
  studio --arch mistral-7b --seq 8192 --bs 2 --steps 4 --warmup 2 --set memory.micro_batch_size=1
  anchor --arch llama3.1-8b --seq 4096 --bs 2 --steps 4 --warmup 2
  studio --arch llama3.1-8b --seq 4096 --bs 2 --steps 4 --warmup 2 --set memory.micro_batch_size=1
fi

#!/usr/bin/env bash
# Issue 9 recipe sweep on one GPU (runs in parallel: a 135M model leaves the GPU mostly idle, so processes overlap).
# Usage (device machine, repo root, after device_setup.sh): DATA=hh.jsonl.gz W=/tmp/rx bash experiments/sweep_gpu.sh
set -u
W=${W:-/tmp/rx}; OUT=${OUT:-/tmp/out}; DATA=${DATA:-../shared/data/hh-harmless-dev.jsonl.gz}
export OMP_NUM_THREADS=1
python3 experiments/recipes.py prepare --data "$DATA" --work "$W" > "$OUT/split.json" 2>>"$OUT/sweep.err"
common=(--set train.per_device_train_batch_size=8 --set train.gradient_accumulation_steps=2 --set kto.max_length=768)
run() { name=$1; shift; python3 experiments/recipes.py run --work "$W" --name "$name" "${common[@]}" "$@" \
          >> "$OUT/sweep.log" 2>>"$OUT/sweep.err"; cp "$W/results/$name.json" "$OUT/" 2>/dev/null; }
run seed-5e-7 --recipe conservative --set train.per_device_train_batch_size=8 &
run lr5e-5 --set train.learning_rate=5e-5 &
run lr2e-4 --set train.learning_rate=2e-4 &
run lr5e-4 --set train.learning_rate=5e-4 &
run lr1e-3 --set train.learning_rate=1e-3 &
run lr5e-4-ep2 --set train.learning_rate=5e-4 --set train.num_train_epochs=2 &
run lr5e-4-b0.05 --set train.learning_rate=5e-4 --set kto.beta=0.05 &
run imb-lr5e-4 --imbalanced --set train.learning_rate=5e-4 &
run qlora-lr5e-4 --set train.learning_rate=5e-4 --set model.backend=bnb &
wait
python3 experiments/recipes.py table --work "$W" | tee "$OUT/recipes_table.md"

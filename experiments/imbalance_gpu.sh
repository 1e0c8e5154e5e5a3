#!/usr/bin/env bash
# Issue 9, imbalanced data: variants of "10% of the desirable rows + balanced weights" against the balanced default,
# all with the default recipe (lr 1e-3 for the bundled model), run concurrently on one GPU like sweep_gpu.sh.
# ONLY="name ..." runs just those variants.
# Usage (device machine, repo root, after device_setup.sh): DATA=hh.jsonl.gz W=/tmp/rx OUT=... bash experiments/imbalance_gpu.sh
set -u
W=${W:-/tmp/rx}; OUT=${OUT:-/tmp/out}; DATA=${DATA:-../shared/data/hh-harmless-dev.jsonl.gz}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
python3 experiments/recipes.py prepare --data "$DATA" --work "$W" > "$OUT/split.json" 2>>"$OUT/imbalance.err"
common=(--set train.per_device_train_batch_size=8 --set train.gradient_accumulation_steps=2 --set kto.max_length=768)
run() { name=$1; shift; case " ${ONLY:-$name} " in *" $name "*) ;; *) return;; esac; python3 experiments/recipes.py run --work "$W" --name "$name" "${common[@]}" "$@" \
          >> "$OUT/imbalance.log" 2>>"$OUT/imbalance.err"; cp "$W/results/$name.json" "$OUT/" 2>/dev/null; }
run balanced-seed7 --set train.seed=7 &
run imb-auto-seed7 --imbalanced --set train.seed=7 &
run imb-norm --imbalanced --weights normalized &
run imb-auto-ep2 --imbalanced --set train.num_train_epochs=2 &
run imb-norm-ep2 --imbalanced --weights normalized --set train.num_train_epochs=2 &
run imb-oversample --imbalanced --oversample &
run imb-auto-b0.05 --imbalanced --set kto.beta=0.05 &
run imb-norm-ep3 --imbalanced --weights normalized --set train.num_train_epochs=3 &
run imb-auto-ep2-seed7 --imbalanced --set train.num_train_epochs=2 --set train.seed=7 &
wait
python3 experiments/recipes.py table --work "$W" | tee "$OUT/imbalance_table.md"

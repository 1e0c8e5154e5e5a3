#!/usr/bin/env bash
# Issue 7 check on a 2-GPU machine: `accelerate launch -m studio train` data-parallel on the bitsandbytes path,
# against one GPU with the same global batch (per-device 2 x 2 GPUs  vs  per-device 2 x grad-accum 2).
# MODEL=/path or bundled:smollm2-135m and DATA=file.jsonl use a real model on real data (losses that move).
# Run from the repo root on the device machine after `source .whl/device_setup.sh`.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ARCH=${ARCH:-qwen2.5-3b}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 - <<'PY'
import sys; sys.path.insert(0, ".")
from bench.random_models import make_model_dir, write_dataset
import os
d = make_model_dir(os.environ.get("ARCH", "qwen2.5-3b"))
write_dataset("/tmp/mg_data.jsonl", 64, 100, 100, seed=1)
open("/tmp/mg_model", "w").write(d)
PY
rm -rf /tmp/mg_single /tmp/mg_ddp
MODEL=${MODEL:-$(cat /tmp/mg_model)}; DATA=${DATA:-/tmp/mg_data.jsonl}; LR=${LR:-0.001}
common=(--set model.name_or_path=$MODEL --set model.backend=bnb --set data.train_file=$DATA
        --set train.max_steps=6 --set train.learning_rate=$LR --set train.warmup_steps=0 --set train.save_steps=1000
        --set train.lr_scheduler_type=constant --set kto.max_length=${SEQ:-256} --set train.per_device_train_batch_size=2
        --set lora.r=16)
cat > /tmp/mg.yaml <<'Y'
name: multigpu
Y
# one GPU, grad-accum 2
CUDA_VISIBLE_DEVICES=0 timeout 280 python3 -m studio train /tmp/mg.yaml "${common[@]}" --set output_dir=/tmp/mg_single \
  --set train.gradient_accumulation_steps=2 > "$OUT/single.log" 2>&1; echo "single rc=$?"
# two GPUs, data-parallel
timeout 280 accelerate launch --num_processes 2 --multi_gpu -m studio train /tmp/mg.yaml "${common[@]}" \
  --set output_dir=/tmp/mg_ddp --set train.gradient_accumulation_steps=1 > "$OUT/ddp.log" 2>&1; echo "ddp rc=$?"
python3 - <<'PY' | tee "$OUT/compare.txt"
import json, os
def losses(d):
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    return [(r["step"], round(r["loss"], 6)) for r in rows if "loss" in r]
s, m = losses("/tmp/mg_single"), losses("/tmp/mg_ddp")
print("single:", s); print("ddp   :", m)
print("max |diff|:", max(abs(a[1]-b[1]) for a, b in zip(s, m)) if s and m else None)
print("adapters:", [p for p in ("/tmp/mg_single/adapter", "/tmp/mg_ddp/adapter") if os.path.isfile(p + "/adapter_model.safetensors")])
PY
grep -E "rank|RANK|device|Device" "$OUT/ddp.log" | head -20

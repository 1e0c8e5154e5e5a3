#!/usr/bin/env bash
# Long GPU jobs that only need memory figures or accuracies (not timings), started detached on the device machine so
# they outlive one 10-minute call and share the GPU: issue 4's auto-fit check (five streams of
# `bench/memory_bench.py sweep --plan autofit`) and issue 9's imbalance variants (experiments/imbalance_gpu.sh).
#   bash bench/device_jobs.sh start HH_DATA.jsonl.gz    # returns at once
#   bash bench/device_jobs.sh collect                   # tars /tmp/jobs into $OUT/jobs.tgz; prints what is still running
# Run from the repo root; the environment of device_setup.sh must be exported (PYTHONPATH=/tmp/site ...).
set -u
J=/tmp/jobs
if [ "${1:-}" = start ]; then
  mkdir -p $J /tmp/models
  # memory_bench names checkpoints by preset key: rename the identical architectures perf_gpu.sh already built (the
  # sweep's --cleanup then frees their disk too: seven random checkpoints at once would not fit the 64 GB disk)
  for pair in qwen2.5-3b-instruct:qwen2.5-3b mistral-7b-instruct-v0.3:mistral-7b llama-3.1-8b-instruct:llama3.1-8b; do
    [ -e /tmp/models/${pair#*:}/done ] && [ ! -e /tmp/models/${pair%%:*} ] && mv /tmp/models/${pair#*:} /tmp/models/${pair%%:*}
  done
  i=0
  # STREAMS: space-separated "models:paths" (default: every tiered preset on both paths, five at once)
  for stream in ${STREAMS:-qwen2.5-3b-instruct:unsloth,bnb llama-3.2-3b-instruct:unsloth,bnb phi-3.5-mini-instruct:unsloth,bnb \
                mistral-7b-instruct-v0.3,qwen2.5-7b-instruct:unsloth,bnb llama-3.1-8b-instruct,gemma-7b-it:unsloth,bnb}; do
    i=$((i+1))
    setsid nohup bash -c "python3 bench/memory_bench.py sweep --plan autofit --models ${stream%%:*} --paths ${stream#*:} \
      --grad-accum 1 --cleanup --timeout 900 --out $J/autofit_$i.jsonl > $J/autofit_$i.log 2>&1; touch $J/autofit_$i.done" \
      > /dev/null 2>&1 &
  done
  [ -z "${2:-}" ] && { sleep 2; ls $J; exit 0; }
  setsid nohup bash -c "DATA=$2 W=/tmp/rx OUT=$J/imb bash experiments/imbalance_gpu.sh > $J/imb.log 2>&1; touch $J/imb.done" \
    > /dev/null 2>&1 &
  sleep 2; ls $J
elif [ "${1:-}" = collect ]; then
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  df -h /tmp | tail -1
  ls $J/*.done 2>/dev/null; cat $J/autofit_*.jsonl 2>/dev/null | cut -c1-300
  ls $J/imb 2>/dev/null
  tar czf "${OUT:-/tmp/out}/jobs.tgz" -C /tmp jobs 2>/dev/null; true
fi

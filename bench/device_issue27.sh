#!/usr/bin/env bash
# Issue 27 on one GPU in one device call (what docs/GPU_RESULTS.md reports):
#   source .whl/device_setup.sh; LIMIT=570 bash bench/device_issue27.sh
# 1. the end-to-end check through the tabs' handlers (bench/gpu_e2e.py), three architectures x two storage forms, in
#    the background, each process capped at 7.5 GiB;
# 2. meanwhile the bitsandbytes fit of the four flagship models at full depth (bench/memory_bench.py bnbfit), and,
#    if any ran out of memory, a trace of what held the card (bench/mem_trace.py);
# 3. then every export of a full-depth Llama-3.1-8B stored in NF4 (bench/export_gpu.py --forms nf4).
# Output in $OUT (default /tmp/out27). PARTS picks what runs (default "e2e bnbfit export": two shorter calls can split
# them), BNB_MODELS which flagship models bnbfit measures (default all four), BNB_PARALLEL how many at once.
set -u
PARTS=${PARTS:-e2e bnbfit export}
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
OUT=${OUT:-/tmp/out27}
mkdir -p "$OUT"
LIMIT=${LIMIT:-570}
LAYERS=${LAYERS:-2}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, trl, peft, bitsandbytes, gradio; print(torch.__version__, torch.version.cuda, transformers.__version__, trl.__version__, peft.__version__, bitsandbytes.__version__, gradio.__version__)" >> "$OUT/gpu.txt" 2>&1
rm -rf /tmp/e2e /tmp/models /tmp/eg
E2E=
if has e2e; then
  python3 bench/gpu_e2e.py --work /tmp/e2e --layers "$LAYERS" --parallel 6 --steps 10 --deadline $(( $(left) - 45 )) \
    > "$OUT/e2e.txt" 2>&1 &
  E2E=$!
fi
if has bnbfit; then
  if has export; then BNB=$(( LIMIT > 520 ? 260 : LIMIT - 90 )); else BNB=$(( LIMIT - 60 )); fi
  timeout $(( BNB + 10 )) python3 bench/memory_bench.py bnbfit --parallel "${BNB_PARALLEL:-1}" --deadline "$BNB" \
    ${BNB_MODELS:+--models "$BNB_MODELS"} --out "$OUT/bnbfit.jsonl" > "$OUT/bnbfit.txt" 2>&1
fi
if has bnbfit && grep -qi "out of memory\|OutOfMemory" "$OUT/bnbfit.jsonl" 2>/dev/null; then
  M=$(grep -il "out of memory" "$OUT/bnbfit.jsonl" >/dev/null && python3 -c "
import json
for l in open('$OUT/bnbfit.jsonl'):
    r = json.loads(l)
    if 'memory' in str(r.get('error', '')).lower(): print(r['model']); break")
  timeout $(( $(left) > 200 ? 110 : 20 )) python3 bench/mem_trace.py --top 20 -- bench/memory_bench.py run --model "$M" \
    --path bnb --autofit --fixed-seq --seq 1024 --precompute-ref --cap-gib 7.5 --steps 2 --grad-accum 1 \
    > "$OUT/trace.txt" 2>&1
  rm -rf /tmp/models
fi
if has export && [ "$(left)" -gt 150 ]; then  # a full-depth NF4 base and its exports: about 40 GB of disk, 2-4 minutes
  timeout $(( $(left) - 40 )) python3 bench/export_gpu.py --forms nf4 > "$OUT/export.txt" 2>&1
fi
[ -n "$E2E" ] && wait $E2E
cp /tmp/e2e/log-* "$OUT/" 2>/dev/null
echo "done in $(( $(date +%s) - T0 )) s"
tail -25 "$OUT/e2e.txt"; echo; tail -8 "$OUT/bnbfit.txt"; echo; grep -E "^STEP|^RESULT" "$OUT/export.txt" | cut -c1-400
grep -h TRACE "$OUT/trace.txt" 2>/dev/null | cut -c1-3000

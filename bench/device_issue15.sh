#!/usr/bin/env bash
# One device call (after `source .whl/device_setup.sh`, the GGUF parts in /tmp/g): issue 15's sweep of the default
# config over five seeds on both variants plus the lr 5e-3 CLI run (bench/robust_gpu.sh), then, when the sweep left
# time, the held-out watch's overhead (bench/watch_overhead.py, the same rows with and without the watch, alone on the
# card). Results go to $OUT. LIMIT: seconds this call may take.
set -u
# P: runs at a time; 11 (5 + 5 + the lr 5e-3 run) finish in about 330 s, 15 took over 540 s (2026-12-02).
T0=$(date +%s)
export KTO_STUDIO_HOME=/tmp/kto_home_rb
CANDS="${CANDS:-default|}" P=${P:-11} SEEDS="${SEEDS:-42 7 1 2 3}" WORK=/tmp/rb OUTDIR=$OUT \
  RUN_LIMIT=$(( ${LIMIT:-580} - 60 )) bash bench/robust_gpu.sh > $OUT/sweep_driver.txt 2>&1
echo "sweep done after $(( $(date +%s) - T0 )) s"
if [ $(( $(date +%s) - T0 )) -lt $(( ${LIMIT:-580} - 150 )) ]; then
  timeout $(( ${LIMIT:-580} - ($(date +%s) - T0) - 10 )) python3 bench/watch_overhead.py --work /tmp/wo --data /tmp/g/hh-harmless-dev.jsonl.gz > $OUT/watch_overhead.txt 2>&1
  tail -5 $OUT/watch_overhead.txt
fi
tail -20 $OUT/robust_table.md 2>/dev/null

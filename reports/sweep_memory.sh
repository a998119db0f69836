#!/usr/bin/env bash
# Memory as tasks grow (issue 22 part 5): every continual method on the real suite's long order long1
# (8 tasks), seed 0, with the adapter the quick comparison trains (r 8 on q_proj and v_proj). What is
# measured is each method's state after every task (adapter, optimizer and replay-buffer bytes, in
# results.json and `mbf compare`'s memory.png): it depends on the sizes, not on how well a task is
# learned, so each task trains only STEPS steps and is scored on N_TEST examples (ranked). Accuracies
# from this sweep mean nothing; the real-text comparison is reports/sweep_paired.sh's.
#   usage: bash reports/sweep_memory.sh [OUT=reports/memory]
#   env: STEPS (2), N_TEST (8), METHODS, JOBS_AT_ONCE (2), MBF, EXTRA (more flags)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-reports/memory}
MBF=${MBF:-.venv/bin/mbf}
for m in ${METHODS:-slao seq-lora o-lora inflora task-arithmetic ties replay}; do
  echo "long1-$m-s0 --suite real --order long1 --method $m --seed 0 --threads 1 --n-train 100" \
    "--n-test ${N_TEST:-8} --max-steps ${STEPS:-2} --batch-size 8 --lr 1e-3 --max-length 128" \
    "--scoring rank --prompt-format auto ${EXTRA:-}"
done | MBF=$MBF bash reports/run_job.sh "$OUT" "${JOBS_AT_ONCE:-2}"
$MBF compare "$OUT"/run/*/ --baseline none --out "$OUT/compare" > "$OUT/logs/compare.log" 2>&1
echo "$(date -u +%T) sweep finished: $OUT/compare/compare.md ($OUT/compare/memory.png)"

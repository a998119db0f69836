#!/usr/bin/env bash
# The committed sweep: SLAO, seq-lora, the ablations and multi-task on the built-in suite with the
# embedded SmolLM2-135M-Instruct, seeds 0-2, two runs at a time with one thread each (2 CPU cores).
# Reruns resume: a finished run is skipped, a cut one continues from its last finished task.
#   usage: bash reports/sweep.sh [OUT=reports/sweep]
#   env: METHODS, SEEDS (space-separated), EXTRA (more `mbf continual` flags, e.g. --load-in-4bit)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-reports/sweep}
MBF=${MBF:-.venv/bin/mbf}
mkdir -p "$OUT/run" "$OUT/logs"
jobs=()
for seed in ${SEEDS:-0 1 2}; do
  for method in ${METHODS:-slao seq-lora ftba-mb slao-inverse slao-random slao-last-merge multi-task}; do
    jobs+=("$method $seed")
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c '
  method=$0; seed=$1; run='"$OUT"'/run/$method-s$seed
  if [ -f $run/results.json ] && grep -q "\"complete\": true" $run/results.json; then exit 0; fi
  resume=""; [ -f $run/results.json ] && resume=--resume
  echo "$(date -u +%T) start $method seed $seed"
  '"$MBF"' continual --suite conflict --method $method --seed $seed --out $run --threads 1 \
      --max-steps 20 --n-test 100 '"${EXTRA:-}"' $resume > '"$OUT"'/logs/$method-s$seed.log 2>&1
  rc=$?
  echo "$(date -u +%T) done  $method seed $seed rc=$rc $(tail -2 '"$OUT"'/logs/$method-s$seed.log | head -1)"
'
"$MBF" compare "$OUT"/run/*/ --out "$OUT" > "$OUT/logs/compare.log" 2>&1
echo "$(date -u +%T) sweep finished: $OUT/compare.md"

#!/usr/bin/env bash
# Extra ablations after reports/sweep.sh, to find where SLAO's gain comes from:
#   slao --schedule none   QR init, no merge (the merged adapter is the fine-tuned one)
#   slao-constant          QR init, merge with a constant lambda = 0.5
# Same settings and resumability as sweep.sh; then one comparison over every run.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-reports/sweep}
MBF=${MBF:-.venv/bin/mbf}
mkdir -p "$OUT/run" "$OUT/logs"
for seed in 0 1 2; do
  echo "slao-sched-none $seed --method slao --schedule none"
  echo "slao-constant $seed --method slao-constant"
done | xargs -P 2 -L 1 bash -c '
  name=$0; seed=$1; shift 1; run='"$OUT"'/run/$name-s$seed
  if [ -f $run/results.json ] && grep -q "\"complete\": true" $run/results.json; then exit 0; fi
  resume=""; [ -f $run/results.json ] && resume=--resume
  echo "$(date -u +%T) start $name seed $seed"
  '"$MBF"' continual --suite conflict "$@" --seed $seed --out $run --threads 1 \
      --max-steps 20 --n-test 100 $resume > '"$OUT"'/logs/$name-s$seed.log 2>&1
  rc=$?
  echo "$(date -u +%T) done  $name seed $seed rc=$rc $(tail -2 '"$OUT"'/logs/$name-s$seed.log | head -1)"
'
"$MBF" compare "$OUT"/run/*/ --out "$OUT" > "$OUT/logs/compare.log" 2>&1
echo "$(date -u +%T) extra sweep finished: $OUT/compare.md"

#!/usr/bin/env bash
# Regenerate every committed comparison whose runs keep their per-example predictions, each with the
# command that made it (reports/sweep_paired.sh, reports/sweep_methods.sh compare, reports/sweep_memory.sh,
# `mbf demo --suite domains`), into a scratch folder, and check that its compare.md and compare.json are the
# committed files byte for byte (the plots are not compared: matplotlib's output varies with its version).
# Its use: the committed runs' predictions are stored packed (reports/pack_predictions.py); this shows that
# the committed tables still follow from what is committed.
#   usage: bash reports/check_compares.sh [SCRATCH=$(mktemp -d)]
#   env: MBF (.venv/bin/mbf)
set -u
cd "$(dirname "$0")/.."
TMP=${1:-$(mktemp -d)}
MBF=${MBF:-.venv/bin/mbf}
failed=0
check() {  # check COMMITTED_DIR ARGS...: mbf compare ARGS --out TMP/..., then both files compared
  local dir=$1
  shift
  local out="$TMP/$dir"
  mkdir -p "$(dirname "$out")"
  if ! $MBF compare "$@" --out "$out" > "$out.log" 2>&1; then
    echo "FAILED  $dir (mbf compare: $out.log)"; failed=1; return
  fi
  for f in compare.md compare.json; do
    if cmp -s "$out/$f" "$dir/$f"; then echo "same    $dir/$f"; else echo "DIFFERS $dir/$f"; failed=1; fi
  done
}
P=reports/paired
check $P/compare $P/run/std*/ --baseline seq-lora
check $P/compare-vs-ftba-mb $P/run/std*/ --baseline ftba-mb
check $P/compare-vs-slao $P/run/std*/ --baseline slao
check $P/compare-rank $P/run/std*/ --scorer rank
check $P/compare-rank-vs-ftba-mb $P/run/std*/ --baseline ftba-mb --scorer rank
check $P/compare-long1 $P/run/long1-*/ --baseline seq-lora
M=reports/methods
for order in std1 long1; do
  check $M/compare-$order $M/run/$order-*/ --baseline seq-lora
  check $M/compare-$order-vs-slao $M/run/$order-*/ --baseline slao
done
check reports/memory/compare reports/memory/run/*/ --baseline none
D=reports/demo-domains
check $D/compare $D/slao $D/seq-lora $D/multi-task
exit $failed

#!/usr/bin/env bash
# One resumable run of a sweep (reports/sweep_real.sh, reports/sweep_paired.sh):
#   bash reports/run_job.sh OUT NAME FLAGS...
# runs `$MBF continual FLAGS --out OUT/run/NAME`: nothing when that run is complete, --resume when a cut
# one is there; its output goes to OUT/logs/NAME.log, and one line at its start and end to stdout.
set -u
out=$1 name=$2
shift 2
run=$out/run/$name
if [ -f "$run/results.json" ] && grep -q '"complete": true' "$run/results.json"; then exit 0; fi
resume=()
[ -f "$run/results.json" ] && resume=(--resume)
echo "$(date -u +%T) start $name"
"${MBF:-.venv/bin/mbf}" continual "$@" --out "$run" "${resume[@]}" > "$out/logs/$name.log" 2>&1
rc=$?
echo "$(date -u +%T) done  $name rc=$rc $(tail -2 "$out/logs/$name.log" | head -1)"

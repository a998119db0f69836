#!/usr/bin/env bash
# The resumable job runner of the sweeps (reports/sweep_real.sh, reports/sweep_paired.sh).
#   job_list | bash reports/run_job.sh OUT [JOBS_AT_ONCE=2]
#     reads one run per line, "NAME FLAGS..." (FLAGS: `mbf continual` flags), and runs JOBS_AT_ONCE at a
#     time, in the order given (so a cut sweep holds its first jobs), each as below
#   bash reports/run_job.sh OUT NAME FLAGS...
#     runs `$MBF continual FLAGS --out OUT/run/NAME`: nothing when that run is complete, --resume when a
#     cut one is there; its output goes to OUT/logs/NAME.log (appended to on --resume, so the cut run's part
#     stays), and one line at its start and end to stdout.
# The exit status is 1 when the run failed (the list: when any run failed, after every run was tried).
set -u
out=$1
export MBF=${MBF:-.venv/bin/mbf} OMP_WAIT_POLICY=PASSIVE
mkdir -p "$out/run" "$out/logs"
if [ $# -le 2 ]; then
  # (sed: xargs -L would join a line that ends in a blank with the next one)
  sed "s/ *$//" | xargs -P "${2:-2}" -L 1 bash "$0" "$out" && exit 0
  echo "$(date -u +%T) some runs failed: their logs are in $out/logs" >&2
  exit 1
fi
name=$2
shift 2
run=$out/run/$name
if [ -f "$run/results.json" ] && grep -q '"complete": true' "$run/results.json"; then exit 0; fi
resume=()
log=$out/logs/$name.log
if [ -f "$run/results.json" ]; then
  resume=(--resume)
  echo "--- $(date -u +%FT%TZ) resumed" >> "$log"  # the cut run's log stays above
else
  : > "$log"
fi
echo "$(date -u +%T) start $name${resume:+ (resumed)}"
"$MBF" continual "$@" --out "$run" "${resume[@]}" >> "$log" 2>&1
rc=$?
echo "$(date -u +%T) done  $name rc=$rc $(tail -2 "$log" | head -1)"
[ $rc -eq 0 ] || exit 1  # (not the run's own status: xargs stops every run on a 255)

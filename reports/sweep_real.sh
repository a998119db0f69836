#!/usr/bin/env bash
# The committed real-text sweep (issue 14): the real suite's standard order std1 (dbpedia -> amazon ->
# yahoo -> bbc) with SLAO, seq-lora, multi-task, the paper's five merge ablations and slao-random,
# seeds 0-2, and SLAO / seq-lora / multi-task on the long order long1 (8 tasks). Embedded
# SmolLM2-135M-Instruct on CPU, two runs at a time with one thread each (2 shared cores).
#
# Sized for a 2-core machine shared with other jobs, not the paper's regime: 12 optimizer steps of
# batch 8 per task (96 of the 200 drawn training examples), lr 1e-3, prompts cut to 96 tokens (only the
# input is cut), 30 test examples per task (20 on the long order). The jobs run in priority order, so
# a cut sweep still holds the main comparison; reruns resume (a finished run is skipped, a cut one
# continues from its last finished task).
#   usage: bash reports/sweep_real.sh [OUT=reports/real]
#   env: SUITE_SEED (the data sample of every job, 0: this sweep predates seeds that replicate, as it
#        predates chat prompts: --prompt-format plain), JOBS (override the job list: "name method seed order n_test" lines), MBF, STEPS (optimizer
#        steps per task, 12), N_TRAIN (training examples drawn per task, 200), N_TEST / N_TEST_LONG
#        (test examples per task of the default jobs, 30 / 20), EXTRA (more flags)
#   the main result (reports/real-30, `make sweep`): STEPS=30 N_TRAIN=240 N_TEST=40
set -u
cd "$(dirname "$0")/.."
OUT=${1:-reports/real}
MBF=${MBF:-.venv/bin/mbf}
NT=${N_TEST:-30}; NT_LONG=${N_TEST_LONG:-20}
default_jobs() {
  for seed in 0 1 2; do for m in slao seq-lora multi-task; do echo "$m-s$seed $m $seed std1 $NT"; done; done
  for m in ftba-mb ftba-mba frea-mb ftba-ma freb-ma slao-random; do echo "$m-s0 $m 0 std1 $NT"; done
  for m in slao seq-lora multi-task; do echo "long1-$m-s0 $m 0 long1 $NT_LONG"; done
  for seed in 1 2; do
    for m in ftba-mb ftba-mba frea-mb ftba-ma freb-ma slao-random; do echo "$m-s$seed $m $seed std1 $NT"; done
  done
}
# each "name method seed order n_test" job as one line of `mbf continual` flags after its name
# (reports/run_job.sh runs it, resumably)
if [ -n "${JOBS:-}" ]; then printf '%s\n' "$JOBS"; else default_jobs; fi | while read -r name method seed order ntest; do
  echo "$name --suite real --order $order --method $method --seed $seed --threads 1" \
    "--n-train ${N_TRAIN:-200} --n-test $ntest --max-steps ${STEPS:-12} --batch-size 8 --lr 1e-3" \
    "--max-length 96 --suite-seed ${SUITE_SEED:-0} --prompt-format plain ${EXTRA:-}"
done | MBF=$MBF bash reports/run_job.sh "$OUT" 2
# one comparison per order (compare refuses to average different task sequences of different suites)
$MBF compare $(ls -d "$OUT"/run/*/ | grep -v /long1-) --out "$OUT/std1" > "$OUT/logs/compare-std1.log" 2>&1
$MBF compare "$OUT"/run/long1-*/ --out "$OUT/long1" > "$OUT/logs/compare-long1.log" 2>&1
echo "$(date -u +%T) sweep finished: $OUT"

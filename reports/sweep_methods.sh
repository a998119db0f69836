#!/usr/bin/env bash
# Issue 22: SLAO among the methods it is measured against (O-LoRA, InfLoRA, task arithmetic, TIES,
# replay), at the same steps per task and rank, each at the learning rate it chose on held-out data.
#   bash reports/sweep_methods.sh lr        1. the choice: every method at each learning rate of LRS on
#                                              std1 seed 0, scored on held-out training examples
#                                              (--eval-split validation: the test split is not seen), then
#                                              reports/pick_lr.py writes OUT/lr/choice.md and chosen.txt
#   bash reports/sweep_methods.sh compare   2. every method at its chosen rate, ORDERS x SEEDS, on the
#                                              test split, with paired intervals against seq-lora
#                                              (OUT/compare-ORDER, one per order) and against SLAO
#                                              (OUT/compare-ORDER-vs-slao)
# Settings as reports/sweep_paired.sh (reports/real_flags.sh: 30 steps x batch 8 per task, r 8 on q/v, chat template, both
# scorers, 200 test examples per task on the cells AA/BWT/LA read). Resumable (reports/run_job.sh).
#   env: OUT (reports/methods), METHODS, LRS ("3e-4 1e-3 3e-3"), N_VAL (held-out examples per task,
#        100), N_TEST (200), OFFDIAG (50), STEPS (30), N_TRAIN (240), MAX_LENGTH (128), ORDERS ("std1"), SEEDS ("0 1 2"),
#        JOBS_AT_ONCE (2), MBF, PYTHON (.venv/bin/python: runs reports/pick_lr.py), EXTRA, REUSE (finished
#        runs of the same name and settings to copy instead of re-running: reports/paired/run)
#   a short check of the pipeline: STEPS=1 N_TRAIN=8 N_VAL=4 N_TEST=4 OFFDIAG=2 METHODS="seq-lora ties"
#        LRS="1e-3 3e-3" SEEDS=0 OUT=/tmp/check
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/methods}
MBF=${MBF:-.venv/bin/mbf}
REUSE=${REUSE:-reports/paired/run}
METHODS=${METHODS:-seq-lora slao o-lora inflora task-arithmetic ties replay}
source reports/real_flags.sh
COMMON=$(real_flags)
case ${1:-} in
  lr)
    for m in $METHODS; do for lr in ${LRS:-3e-4 1e-3 3e-3}; do
      echo "$m-lr$lr $COMMON --order std1 --seed 0 --method $m --lr $lr --eval-split validation" \
        "--n-test ${N_VAL:-100} --offdiag-test ${OFFDIAG:-50} --scoring generate ${EXTRA:-}"
    done; done | MBF=$MBF bash reports/run_job.sh "$OUT/lr" "${JOBS_AT_ONCE:-2}" || true  # pick_lr names them
    "${PYTHON:-.venv/bin/python}" reports/pick_lr.py "$OUT/lr" ;;
  compare)
    chosen=$OUT/lr/chosen.txt
    [ -f "$chosen" ] || { echo "$chosen: run 'bash reports/sweep_methods.sh lr' first" >&2; exit 2; }
    lr_of() { awk -v m="$1" '$1 == m {print $2}' "$chosen"; }
    lr_run() {  # the lr sweep's run of method $1 at its chosen rate (chosen.txt writes 1e-3 as 0.001)
      for lr in ${LRS:-3e-4 1e-3 3e-3}; do
        awk -v a="$lr" -v b="$(lr_of "$1")" 'BEGIN { exit !(a + 0 == b + 0) }' && echo "$OUT/lr/run/$1-lr$lr"
      done
    }
    for m in $METHODS; do  # every rate before any run starts (an exit inside the pipe below would not stop it)
      [ -n "$(lr_of "$m")" ] || { echo "$chosen: no learning rate for $m" >&2; exit 2; }
    done
    # a run the paired re-run (issue 21) already made with exactly these settings is copied, not re-run
    # (seq-lora and SLAO where their chosen rate is its 1e-3): reports/reuse_run.py checks the fields
    # named here and, --like, every other setting against this sweep's own run of the method at that rate
    if [ -z "${EXTRA:-}" ]; then
      for seed in ${SEEDS:-0 1 2}; do for order in ${ORDERS:-std1}; do for m in $METHODS; do
        name=$order-$m-s$seed
        [ -d "$REUSE/$name" ] || continue
        "${PYTHON:-.venv/bin/python}" reports/reuse_run.py --like "$(lr_run "$m")" \
          "$REUSE/$name" "$OUT/run/$name" method="$m" seed="$seed" train.seed="$seed" order="$order" \
          eval_split=test train.lr="$(lr_of "$m")" n_test="${N_TEST:-200}" \
          train.offdiag_test="${OFFDIAG:-50}" train.scoring=both
      done; done; done
    fi
    for seed in ${SEEDS:-0 1 2}; do for order in ${ORDERS:-std1}; do for m in $METHODS; do
      lr=$(lr_of "$m")
      echo "$order-$m-s$seed $COMMON --order $order --seed $seed --method $m --lr $lr" \
        "--n-test ${N_TEST:-200} --offdiag-test ${OFFDIAG:-50} --scoring both ${EXTRA:-}"
    done; done; done | MBF=$MBF bash reports/run_job.sh "$OUT" "${JOBS_AT_ONCE:-2}" || failed=1
    # one comparison per order (long1's eight tasks are not std1's four), against seq-lora and against SLAO
    # (docs/results.md's "where SLAO stands": paired_table.py --extra OUT/compare-ORDER-vs-slao)
    for order in ${ORDERS:-std1}; do for base in seq-lora slao; do
      cmp=compare-$order
      [ "$base" = seq-lora ] || cmp=$cmp-vs-$base
      $MBF compare "$OUT"/run/"$order"-*/ --baseline "$base" --out "$OUT/$cmp" \
        > "$OUT/logs/$cmp.log" 2>&1 || failed=1
      echo "$(date -u +%T) finished: $OUT/$cmp/compare.md"
    done; done
    # the finished runs' predictions packed, one file each (what the committed runs keep; compare reads it)
    [ -n "${failed:-}" ] || "${PYTHON:-.venv/bin/python}" reports/pack_predictions.py --remove "$OUT"/run/ || failed=1
    exit "${failed:-0}" ;;
  *) sed -n 2,17p "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call sized for a 10-minute window (stages and their time
# limits: mbf/bench/gpu.py):
#   bash bench/run_gpu.sh             on the GPU machine: installs this checkout without dependencies
#                                     (the machine has torch, triton, transformers, peft; no registry),
#                                     then the stages, everything under ${OUT:-bench/results}
#   bash bench/run_gpu.sh --dry-run   the same stages on a CPU through Triton's interpreter (CI runs it)
# bitsandbytes (for the PEFT + bitsandbytes baselines) is installed from the wheel `make bnb-wheel`
# puts in ${BNB_WHEEL_DIR:-wheels/} (carry that folder to the machine) when the machine lacks it;
# without it those rows are skipped, not faked. Back here: python -m mbf.bench.readme --import <files>.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "${1:-}" != "--dry-run" ]; then
  t0=$(date +%s)
  $PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "run_gpu.sh: installing the checkout failed"; exit 3; }
  if ! $PY -c "import bitsandbytes" 2>/dev/null; then
    shopt -s nullglob; wheels=(${BNB_WHEEL_DIR:-wheels}/bitsandbytes-*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then $PY -m pip install -q --no-deps --no-index "${wheels[0]}"
    else echo "run_gpu.sh: no bitsandbytes and no wheel in ${BNB_WHEEL_DIR:-wheels}/: the PEFT + bitsandbytes rows will be skipped"; fi
  fi
  echo "run_gpu.sh: installed in $(( $(date +%s) - t0 )) s"
fi
exec $PY -m mbf.bench.gpu "$@"  # --out: $OUT, else bench/results (a temp dir with --dry-run)

#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call (see mbf/bench/gpu.py for the stages):
#   bash bench/run_gpu.sh             on the GPU machine: installs this checkout without dependencies
#                                     (the machine has torch, triton, transformers, peft; no registry),
#                                     then tests + benchmarks, everything under ${OUT:-bench/results}
#   bash bench/run_gpu.sh --dry-run   the same stages on a CPU through Triton's interpreter (CI runs it)
# bitsandbytes (for the PEFT + bitsandbytes baselines) is installed from a wheel carried in
# ${BNB_WHEEL_DIR:-wheels/} when the machine lacks it; without it those rows are skipped, not faked.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${1:-}" != "--dry-run" ]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "run_gpu.sh: installing the checkout failed"; exit 3; }
  if ! $PY -c "import bitsandbytes" 2>/dev/null; then
    shopt -s nullglob; wheels=(${BNB_WHEEL_DIR:-wheels}/bitsandbytes-*.whl)
    [ ${#wheels[@]} -gt 0 ] && $PY -m pip install -q --no-deps "${wheels[0]}"
  fi
fi
$PY -c "import mbf.kernels.lora_op" || { echo "run_gpu.sh: mbf.kernels does not import (triton?)"; exit 3; }
exec $PY -m mbf.bench.gpu "$@"  # --out: $OUT, else bench/results (a temp dir with --dry-run)

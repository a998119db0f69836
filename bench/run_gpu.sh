#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call sized for a 10-minute window (stages and their time
# limits: mbf/bench/gpu.py):
#   bash bench/run_gpu.sh             on the GPU machine: installs this checkout without dependencies
#                                     (the machine has torch, triton, transformers, peft; no registry),
#                                     then the preflight and the stages, everything under ${OUT:-bench/results}
#   bash bench/run_gpu.sh --dry-run   the same on a CPU through Triton's interpreter (CI runs it)
# The preflight (mbf/bench/preflight.py) imports every module and finds every file a stage needs before
# the first stage, one line each; a stage whose needs are missing is skipped and recorded in timeline.json,
# the others run. It is run by path, in this process with the stages, so that it still reports when the
# package itself does not import.
# bitsandbytes (for the PEFT + bitsandbytes baselines) is installed from the wheel `make bnb-wheel`
# puts in ${BNB_WHEEL_DIR:-wheels/} (carry that folder to the machine) when the machine lacks it;
# without it those rows are skipped, not faked. Back here: python -m mbf.bench.readme --import <files>.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "${1:-}" != "--dry-run" ]; then
  t0=$(date +%s)
  # a failed install is the preflight's to report (the package's line), with everything else missing
  $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "run_gpu.sh: installing the checkout failed"
  if ! $PY -c "import bitsandbytes" 2>/dev/null; then
    shopt -s nullglob; wheels=(${BNB_WHEEL_DIR:-wheels}/bitsandbytes-*.whl)
    if [ ${#wheels[@]} -gt 0 ] && $PY -m pip install -q --no-deps --no-index "${wheels[0]}"; then
      export MBF_BNB_FROM_WHEEL=1
    fi
  fi
  echo "run_gpu.sh: installed in $(( $(date +%s) - t0 )) s"
fi
# by path (runpy), not `-m mbf.bench...`: importing the package is one of the things checked
# the preflight by path (it needs nothing but the standard library), then the stages in the same process
exec $PY - "$@" <<'PY'
import runpy
import sys

preflight = runpy.run_path("mbf/bench/preflight.py")


def stages(argv, checks, seconds):
    from mbf.bench import gpu  # only now: the preflight found that mbf and its measuring library import

    return gpu.main(argv, checks=checks, preflight_s=seconds)


sys.exit(preflight["main"](sys.argv[1:], stages))
PY

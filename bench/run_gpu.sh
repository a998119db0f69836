#!/usr/bin/env bash
# Every benchmark of the package on a CUDA machine, in one go (planned to fit in under 10 minutes
# on an H100/H200): kernel benchmarks, the end-to-end training step and task boundary, then the
# plots and the README tables. Results land in bench/results/<device>-<date>.json.
# Usage: bash bench/run_gpu.sh            (after: pip install --no-deps --no-build-isolation -e .)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu.sh needs a CUDA GPU')"
# the kernel tests first: correctness on the real GPU can differ from the interpreter
python -m pytest tests -q -x
kernel_benches=$(ls bench/test_bench_*.py | grep -v _cpu)
timeout 420 python -m pytest $kernel_benches -q -s -p no:cacheprovider || echo "kernel benchmarks stopped early (rc=$?)"
timeout 300 python -m mbf.bench || echo "end-to-end benchmark stopped early (rc=$?)"
python -m mbf.bench.plot
python -m mbf.bench.readme

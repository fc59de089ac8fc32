# make demo: create .venv, install, run the demo workflow (results in results/)
# make test: create .venv, install, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all
# Test processes (pytest-xdist): most tests wait on process starts and imports, so two overlap well
# on two cores. --dist loadfile keeps each test module on one worker, so a module fixture (a whole
# workflow run) is set up once; the workers share one `make demo` (tests/conftest.py demo_checkout).
TEST_WORKERS ?= 2

CONTAINER_BUILD_ARGS ?=

.PHONY: demo test venv clean lint containers

$(BIN)/snakemake: requirements.txt
	@$(PYTHON) -m ensurepip --version >/dev/null 2>&1 || { echo "error: $(PYTHON) cannot create a virtual environment (no ensurepip module, or no $(PYTHON) at all). On Debian/Ubuntu: sudo apt-get install python3-venv (python3.X-venv for another Python 3.X), then rerun make." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

venv: $(BIN)/snakemake

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --configfile config/demo.yaml --cores $(CORES)

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -raP --durations=30 tests

lint: venv
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --lint

containers:
	containers/build.sh $(CONTAINER_BUILD_ARGS)

clean:
	rm -rf results .snakemake

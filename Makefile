# The README's two commands: `make demo` (set up, then run the whole pipeline on the demo preset)
# and `make test`. Both create .venv and install the project into it first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/patchflow run --preset demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_shards.py
	$(BIN)/python benchmarks/bench_mae_step.py
	$(BIN)/python benchmarks/bench_clip_step.py
	$(BIN)/python benchmarks/bench_dit_step.py
	$(BIN)/python benchmarks/bench_reference_steps.py
	$(BIN)/python benchmarks/bench_stage_efficiency.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_kills.py
	$(BIN)/python benchmarks/bench_orchestration.py
	$(BIN)/python benchmarks/bench_index.py   # 1M vectors: about 25 min on 2 cores

ui: setup
	$(BIN)/patchflow ui

clean:
	rm -rf .patchflow

# Two commands for a newcomer: `make demo` (set up + run the main job), `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench lint monitoring clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	./scripts/install_torch.sh $(BIN)/pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

test: $(STAMP)
	./scripts/install_prometheus.sh
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lightning_fragrance tests benchmarks
	$(BIN)/ruff format --check lightning_fragrance tests benchmarks
	$(BIN)/mypy

demo: $(STAMP)
	./scripts/install_prometheus.sh
	$(BIN)/python -m lightning_fragrance.demo

bench: $(STAMP)
	./scripts/install_bench_tools.sh
	$(BIN)/python benchmarks/run_all.py

monitoring: $(STAMP)
	./scripts/install_prometheus.sh
	$(BIN)/python -m lightning_fragrance.monitoring.local_stack

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache

# Set-up and the two commands of the README. CPU installs pin torch 2.13.0 (see README for CUDA).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev,notebooks]"
	$(BIN)/python -m ipykernel install --user --name python3 >/dev/null
	touch $@

.PHONY: demo test
demo: $(BIN)/.installed
	$(BIN)/probe demo --out runs/demo
	$(BIN)/probe figures --quick --out runs/demo/figures

test: $(BIN)/.installed
	$(BIN)/ruff check probe tests benchmarks scripts notebooks
	$(BIN)/pytest -q


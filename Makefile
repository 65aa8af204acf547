# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use (torch CPU wheel + the pinned stack + maskbank, editable).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q --no-deps "dynamic-network-architectures==0.4.4" "einops>=0.8"
	$(BIN)/python -m pip install -q -e ".[dev,bench,notebook]"
	@touch $(STAMP)

# Build a bank from the sample scans (real ones in ../shared/data when present,
# synthetic phantoms otherwise) and print its summary.
demo: $(STAMP)
	$(BIN)/maskbank demo --out demo-run

# The whole test suite (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/prepare.py

clean-demo:
	rm -rf demo-run

# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench lint format clean

$(BIN)/.installed: setup.py pyproject.toml scripts/system-deps.sh
	PY=$(PY) scripts/system-deps.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,kafka,gui,web]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/livehist demo

# two pytest workers, a test file each at a time (a file's tests share its servers): most tests
# wait on servers and brokers, so two overlap well even on 2 cores (8 min instead of 16)
test: $(BIN)/.installed
	$(BIN)/pytest -n 2 --dist loadfile

bench: $(BIN)/.installed
	$(BIN)/livehist bench

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) *.egg-info

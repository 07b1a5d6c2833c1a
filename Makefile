# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast lint bench fuzz tensorboard clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev,timm,lm,track,optim]'
	touch $(STAMP)

run: install
	$(BIN)/bprun $(ARGS)

test: install
	$(BIN)/pytest -n auto --durations=15 $(ARGS)

# The quick signal while working: everything but the tests marked slow.
test-fast: install
	$(BIN)/pytest -n auto -m "not slow" $(ARGS)

lint: install
	$(BIN)/ruff check bprun tests hydra_plugins
	$(BIN)/ruff format --check bprun tests hydra_plugins

# A long search for command lines that end in a traceback or leave a folder behind
# (tests/fuzz.py; `make test` runs a fixed slice): make fuzz N=2000 SEED=7
N ?= 300
SEED ?= 1
fuzz: install
	$(BIN)/python tests/fuzz.py --n $(N) --seed $(SEED)

bench: install
	$(BIN)/python -m bprun.bench $(ARGS)

tensorboard: install
	$(BIN)/tensorboard --logdir outputs --host 127.0.0.1

clean:
	rm -rf outputs/*/ build dist *.egg-info .pytest_cache .ruff_cache

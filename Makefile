# UniPortrait Lightning: every target runs offline.
PY ?= .venv/bin/python
VENV := .venv
TINY := artifacts/tiny

.PHONY: install tiny demo train-tiny test test-slow test-all bench eval clean

install: $(VENV)/.installed  ## create .venv and install the project with pinned versions

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

tiny: install  ## embedded default: synthetic identity shards + tiny random components on disk
	$(PY) -m src.tiny --out $(TINY)

train-tiny: tiny  ## stage-1 then stage-2 training on the embedded default
	$(PY) -m src.train fit --config configs/tiny/stage1.yaml

demo: train-tiny

test: install  ## fast test suite (slow tests excluded)
	$(PY) -m pytest -q -m "not slow"

test-slow: install  ## only the slow tests (end-to-end runs; .ci/run runs them after `make test`)
	$(PY) -m pytest -q -m slow

test-all: install  ## everything, slow tests included
	$(PY) -m pytest -q

bench: install
	$(PY) -m src.bench

eval: install
	$(PY) -m src.evaluate

clean:
	rm -rf artifacts runs lightning_logs .pytest_cache

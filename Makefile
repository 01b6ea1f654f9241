# UniPortrait Lightning: every target runs offline.
PY ?= .venv/bin/python
VENV := .venv
TINY := artifacts/tiny
# One OpenMP thread per process on the small CPU machines these targets run on: the DataLoader
# worker and test subprocesses share the cores, and oversubscribed OpenMP threads spin (measured
# here: a tiny training step went from 0.08 s to 16 s). Override with `make OMP_NUM_THREADS=2 ...`.
export OMP_NUM_THREADS ?= 1
# `make tiny` is one process with no loader workers, so it takes both cores (measured here: a tiny
# UNet pretraining step 1.5-2.4 s on one thread, 1.0-1.3 s on two).
TINY_THREADS ?= 2
# Extra CLI arguments for both training stages (e.g. `make demo TRAIN_ARGS=--trainer.max_steps=200`,
# what .ci/run does to keep CI inside its time limit); empty for the README's full run.
TRAIN_ARGS ?=

.PHONY: install tiny demo train-tiny train-tiny-stage2 guard test test-slow test-all bench eval clean

install: $(VENV)/.installed  ## create .venv and install the project with pinned versions

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

tiny: install  ## embedded default: synthetic identity shards + tiny random components on disk
	$(PY) -m src.tiny --out $(TINY) --threads $(TINY_THREADS)

train-tiny: tiny  ## stage 1 on the embedded default (loss trend + identity probe printed at the end)
	$(PY) -m src.train fit --config configs/tiny/stage1.yaml $(TRAIN_ARGS)

train-tiny-stage2: tiny  ## stage 2 from stage 1's last.ckpt (routing accuracy printed at the end)
	$(PY) -m src.train fit --config configs/tiny/stage2.yaml $(TRAIN_ARGS)

demo: train-tiny train-tiny-stage2  ## the main job: both stages on the embedded default

guard: tiny  ## after `make demo`: stage 2 without the routing loss (the control), then every learning figure against its threshold
	$(PY) -m src.guard control $(TRAIN_ARGS)
	$(PY) -m src.guard check

test: install  ## fast test suite (slow tests excluded)
	$(PY) -m pytest -q -m "not slow"

test-slow: tiny  ## only the slow tests (end-to-end runs, some on make tiny's world; .ci/run runs them after `make test`)
	$(PY) -m pytest -q -m slow

test-all: tiny  ## everything, slow tests included (builds make tiny's world first)
	$(PY) -m pytest -q

bench: tiny
	$(PY) -m src.bench

eval: install
	$(PY) -m src.evaluate

clean:
	rm -rf artifacts runs lightning_logs .pytest_cache

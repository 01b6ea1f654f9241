# UniPortrait Lightning: every target runs offline.
PY ?= .venv/bin/python
VENV := .venv
TINY := artifacts/tiny
TINY_SDXL := artifacts/tiny-sdxl
# One OpenMP thread per process on the small CPU machines these targets run on: the DataLoader
# worker and test subprocesses share the cores, and oversubscribed OpenMP threads spin (measured
# here: a tiny training step went from 0.08 s to 16 s). Override with `make OMP_NUM_THREADS=2 ...`.
export OMP_NUM_THREADS ?= 1
# `make tiny` is one process with no loader workers, so it takes both cores (measured here: a tiny
# UNet pretraining step 1.5-2.4 s on one thread, 1.0-1.3 s on two).
TINY_THREADS ?= 2
# `make tiny PRETRAIN=1` pretrains the tiny UNet, VAE and face backbone here (~15 min on 2 cores) instead of
# copying the shipped weights of assets/tiny (`make tiny-sdxl PRETRAIN=1`: the tiny SDXL UNet, ~7 min).
PRETRAIN ?=
# Extra CLI arguments for both training stages (e.g. `make demo TRAIN_ARGS=--trainer.max_steps=200`,
# what .ci/run does to keep CI inside its time limit); empty for the README's full run.
TRAIN_ARGS ?=
# What CI trains (`make ci-guard`): both stages cut to 200 steps, each training process on one thread, because
# CI runs three jobs side by side on 2 cores (`make -j3`), and a 2-thread OpenMP process sharing its cores
# with others waits on its own descheduled thread at every parallel region.
CI_TRAIN_ARGS ?= --trainer.max_steps=200 --torch_threads=1

.PHONY: install lint tiny tiny-assets demo train-tiny train-tiny-stage2 guard guard-control ci-tests ci-guard test \
	test-slow browser test-all bench bench-gpu bench-gpu-sdxl full-size eval clean \
	tiny-sdxl tiny-sdxl-assets train-tiny-sdxl train-tiny-sdxl-stage2 demo-sdxl guard-sdxl

install: $(VENV)/.installed  ## create .venv and install the project with pinned versions

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

lint: install  ## ruff over the code, mypy over src/models (their settings: [tool.ruff], [tool.mypy] in pyproject.toml)
	$(PY) -m ruff check src datamodules callbacks tests conftest.py
	$(PY) -m mypy

tiny: install  ## embedded default: synthetic identity shards rendered here + the tiny pretrained parts of assets/tiny
	$(PY) -m src.tiny --out $(TINY) --threads $(TINY_THREADS) $(if $(PRETRAIN),--pretrain)

tiny-assets: install  ## remake assets/tiny: pretrain the tiny parts from scratch in a fresh folder (~15 min), write them + manifest
	rm -rf artifacts/tiny-pretrain
	$(PY) -m src.tiny --out artifacts/tiny-pretrain --threads $(TINY_THREADS) --pretrain --save-assets assets/tiny

train-tiny: tiny  ## stage 1 on the embedded default (loss trend + identity probe printed at the end)
	$(PY) -m src.train fit --config configs/tiny/stage1.yaml $(TRAIN_ARGS)

train-tiny-stage2: tiny  ## stage 2 from stage 1's last.ckpt (routing accuracy printed at the end)
	$(PY) -m src.train fit --config configs/tiny/stage2.yaml $(TRAIN_ARGS)

demo: train-tiny train-tiny-stage2  ## the main job: both stages on the embedded default

# The same on SDXL: a tiny SDXL world (two text encoders, a "text_time" UNet; src/tiny/sdxl.py) on make tiny's
# data and identity encoders, both stages (configs/tiny/sdxl/), runs in runs/tiny-sdxl.
tiny-sdxl: tiny  ## the tiny SDXL world in artifacts/tiny-sdxl (its pretrained UNet copied from assets/tiny-sdxl)
	$(PY) -m src.cli.tiny_sdxl --out $(TINY_SDXL) --threads $(TINY_THREADS) $(if $(PRETRAIN),--pretrain)

tiny-sdxl-assets: tiny  ## remake assets/tiny-sdxl: pretrain the tiny SDXL UNet in a fresh folder (~7 min), write it + manifest
	rm -rf artifacts/tiny-sdxl-pretrain
	$(PY) -m src.cli.tiny_sdxl --out artifacts/tiny-sdxl-pretrain --threads $(TINY_THREADS) --pretrain \
		--save-assets assets/tiny-sdxl

train-tiny-sdxl: tiny-sdxl  ## stage 1 on the tiny SDXL world (identity probe printed at the end)
	$(PY) -m src.train fit --config configs/tiny/sdxl/stage1.yaml $(TRAIN_ARGS)

train-tiny-sdxl-stage2: tiny-sdxl  ## stage 2 on the tiny SDXL world from its stage 1 (routing accuracy printed at the end)
	$(PY) -m src.train fit --config configs/tiny/sdxl/stage2.yaml $(TRAIN_ARGS)

demo-sdxl: train-tiny-sdxl train-tiny-sdxl-stage2  ## the main job on SDXL: both stages on the tiny SDXL world

guard-sdxl: tiny-sdxl  ## after `make demo-sdxl`: its control (stage 2 without the routing loss), then the guard's figures
	$(PY) -m src.guard control --config configs/tiny/sdxl/stage2.yaml $(TRAIN_ARGS)
	$(PY) -m src.guard check --runs runs/tiny-sdxl

guard: guard-control  ## after `make demo`: stage 2 without the routing loss (the control), then every learning figure against its threshold
	$(PY) -m src.guard check

guard-control: tiny  ## stage 2 from stage 1's last.ckpt without the routing loss (runs/tiny/stage2_lambda0)
	$(PY) -m src.guard control $(TRAIN_ARGS)

# CI (.ci/run): `make -j3 ci-tests ci-guard` after `make tiny` runs the tests beside the shortened demo; once
# stage 1 is trained, stage 2 and the control (both start from its checkpoint) run side by side too.
# `-o tiny`: the world is built, so the guard's jobs do not re-run `src.tiny`.
ci-tests: browser  ## make test, then make test-slow (with the browser of the web demo's test)
	$(MAKE) test
	$(MAKE) test-slow

ci-guard:  ## after `make tiny`: the shortened demo (CI_TRAIN_ARGS), its control, and every learning figure against its threshold
	$(MAKE) -o tiny train-tiny TRAIN_ARGS="$(CI_TRAIN_ARGS)"
	$(MAKE) -o tiny train-tiny-stage2 guard-control TRAIN_ARGS="$(CI_TRAIN_ARGS)"
	$(PY) -m src.guard check

test: install  ## fast test suite (slow tests excluded)
	$(PY) -m pytest -q -m "not slow"

test-slow: tiny  ## only the slow tests (end-to-end runs, learning checks, compilation, multi-process; .ci/run runs them after `make test`)
	$(PY) -m pytest -q -m slow

# The web demo's browser test (tests/web/test_web_browser.py) drives Debian's headless Chromium through its
# chromedriver (nothing downloads a browser); without them it skips. Needs root for apt-get (CI runs as root).
browser:  ## Debian's chromium + chromium-driver for the browser test (skipped when both are installed)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium and chromedriver: installed"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

test-all: tiny  ## everything, slow tests included (builds make tiny's world first)
	$(PY) -m pytest -q

bench: tiny  ## the tiny preset's CPU training step, then (with CUDA) the SD1.5-scale benchmark; both into docs/benchmarks.md
	$(PY) -m src.bench

# No `make tiny` (random weights at SD1.5 size) and no `install` (on a GPU machine with the packages installed
# another way: `make bench-gpu PY=python`). Each row is isolated and the table is rewritten after every row.
bench-gpu:  ## the SD1.5-scale benchmark alone on a CUDA device (compiled rows, batch 64 with gradient checkpointing)
	$(PY) -m src.bench_sd15 --compile --big-batch 64

bench-gpu-sdxl:  ## the SDXL-scale benchmark (1024 px) alone on a CUDA device (batch 4, 16 with gradient checkpointing)
	$(PY) -m src.bench_sd15 --arch sdxl --compile --batch-size 4 --big-batch 16

# The stage configs' own commands (`python -m src.train fit --config configs/stage1.yaml`, then stage2.yaml, generate,
# export) at SD1.5 size on the CPU, on random weights: 2 steps per stage, batch 1, two threads per command. Needs
# ~9 GB of disk for the components (written once, kept) and ~14 GB of RAM; run nothing else beside it.
FULL_SIZE ?= artifacts/full-size
full-size: install  ## SD1.5-size random-weight components, both stage configs, generate and export on the CPU, timed into $(FULL_SIZE)/report.json
	$(PY) -m src.cli.full_size --out $(FULL_SIZE) --threads 2

eval: install  ## the benchmark (single-ID, 2/3/4-person splits); options: make eval EVAL_ARGS="--checkpoint ..."
	$(PY) -m src.evaluate $(EVAL_ARGS)

clean:
	rm -rf artifacts runs lightning_logs .pytest_cache

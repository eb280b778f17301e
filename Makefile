# unifuse: the README's commands.
#   make demo   set up if needed, then the toy world end to end: build world + toy backbones (cached),
#               stage 1, stage 2, evaluate on the test split -> outputs/demo/report.json (QUICK=1: a few minutes)
#   make smoke  the tiny-checkpoint smoke path (stage 1, stage 2, fused smoke runs of 3 generators x 2 connectors)
#   make test   set up if needed, then run the fast test tier (CPU, < 15 min)
#   make test-slow   the slow tier: learning checks, kill-at-every-point / random-kill resume, multi-process launchers
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo smoke ablation test test-slow clean tiny

setup: $(STAMP)

# torch + torchvision first: pip takes both from local disk on this machine (the CUDA
# build runs on the CPU); the stock Qwen2.5-VL processor, qwen-vl-utils and the Cosmos DiT
# need torchvision. Then the project itself, whose `torch>=` range is already satisfied.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (unifuse needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

tiny: setup
	$(PY) tools/make_tiny.py out_dir=checkpoints/tiny

demo: setup
	$(PY) tools/demo.py $(if $(QUICK),profile=quick)

ablation: setup
	$(PY) tools/ablate.py $(if $(QUICK),profile=quick)

smoke: setup
	$(PY) tools/make_tiny.py out_dir=checkpoints/tiny skip_existing=true
	$(PY) tools/train.py experiment=tiny_sft hydra.run.dir=outputs/smoke/sft resume=never
	$(PY) tools/train.py experiment=tiny_align init_from=outputs/smoke/sft hydra.run.dir=outputs/smoke/align resume=never
	$(PY) tools/generate.py model=outputs/smoke/align/final conversation=checkpoints/tiny/demo_data/conversations.jsonl \
	    conversation_line=4 steps=8 hydra.run.dir=outputs/smoke/chat
	$(PY) tools/smoke.py -m stage=align generator=tiny_wan,tiny_cosmos,tiny_sana connector=last_mlp,multiscale_queries

# two pytest-xdist workers (one thread each; tests/conftest.py), whole files per worker so module fixtures
# are built once: the fast tier in about 6.5 min here instead of 11 (TEST_WORKERS=0: one process)
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -m "not slow" --timeout=600 --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf outputs multirun checkpoints .pytest_cache

# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing
# on first use and reuse it afterwards (the stamp is rebuilt only when the set-up files change).
# Other stacks (.ci/run uses these): VENV=<folder> EXTRAS=test (no dashboard extra),
# PINS="sae-lens==6.49.2" (extra requirements), PACKAGE=. (a built wheel instead of editable).
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= test,dashboard
PINS ?=
PACKAGE ?= -e .
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
DASHBOARD := $(findstring dashboard,$(EXTRAS))

.PHONY: test lint demo env bench gpu-check clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first, from the pinned local wheel, so nothing below can pull a CUDA build.
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt $(PACKAGE)"[$(EXTRAS)]" $(PINS)
ifneq ($(DASHBOARD),)
	# sae-dashboard -> decode-clt drags in CUDA-built torchvision/torchaudio, which break
	# `import transformers` next to a CPU torch. sae-dashboard never imports them.
	$(PIP) uninstall -y torchvision torchaudio
	# Dashboards inline d3 so they render offline: fetched once from the npm registry into the user cache.
	$(OFFLINE) $(BIN)/sae-lens-allocation fetch-assets || \
	  echo "warning: could not fetch d3; dashboards will link d3's CDN and the browser test will be skipped"
	# Headless Chromium for the dashboard browser test (Debian's package, as root); without it the test skips.
	test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "warning: could not install chromium; the dashboard browser test will be skipped"
endif
	touch $(STAMP)

# Static checks (configured in pyproject.toml); `make test` runs them before the suite. One mypy
# cache per venv: the stacks in .ci/run resolve different dependency versions.
lint: $(STAMP)
	$(BIN)/ruff check sae_lens_allocation tests benchmarks
	$(BIN)/mypy --cache-dir $(VENV)/.mypy_cache sae_lens_allocation

# -P: the package is imported as installed (editable by default), never from the current folder.
test: $(STAMP) lint
	$(OFFLINE) $(BIN)/python -P -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(OFFLINE) $(BIN)/sae-lens-allocation demo --out out/demo

bench: $(STAMP)
	$(OFFLINE) $(BIN)/python benchmarks/allocation.py --quick

# One GPU, no model hub, under 8 minutes: kernels, training steps, host syncs, gradient store,
# embedded training (docs/performance.md). Needs a CUDA build of torch in the venv.
gpu-check: $(STAMP)
	$(OFFLINE) $(BIN)/python benchmarks/gpu_check.py --device cuda --out benchmarks/results

clean:
	rm -rf $(VENV) out

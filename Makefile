# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing
# on first use and reuse it afterwards (the stamp is rebuilt only when the set-up files change).
# Other stacks (.ci/run uses these): VENV=<folder> EXTRAS=test (no dashboard extra),
# PINS="sae-lens==6.49.2" (extra requirements), PACKAGE=. (a built wheel instead of editable),
# `make test-some TESTS=...` (a part of the suite).
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

.PHONY: test test-some lint demo env bench gpu-check gpu-bundle gpu-bundle-wheel clean

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

# The CPU rehearsal of the GPU command (tests/test_gpu_run.py) installs this stack's variant of
# the GPU bundle: downloaded with the environment (an installed environment cannot be packed back
# into wheels), so the tests themselves stay offline.
REHEARSAL_BUNDLE := $(VENV)/gpu-bundle-local
$(REHEARSAL_BUNDLE)/.built: $(STAMP) benchmarks/bundle_pins.py
	$(MAKE) gpu-bundle BUNDLE=$(REHEARSAL_BUNDLE) BUNDLE_VENV=$(VENV) \
	  BUNDLE_PY=$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	touch $@

# Static checks (configured in pyproject.toml); `make test` runs them before the suite. One mypy
# cache per venv: the stacks in .ci/run resolve different dependency versions.
lint: $(STAMP)
	$(BIN)/ruff check sae_lens_allocation sae_lens_allocation_cli tests benchmarks
	$(BIN)/mypy --cache-dir $(VENV)/.mypy_cache sae_lens_allocation sae_lens_allocation_cli

# -P: the package is imported as installed (editable by default), never from the current folder.
test: $(STAMP) lint $(REHEARSAL_BUNDLE)/.built
	$(OFFLINE) $(BIN)/python -P -m pytest -q -p no:cacheprovider tests

# Lint, then only the tests in TESTS, without the GPU-bundle rehearsal: .ci/run's bench stack,
# e.g. make test-some VENV=... EXTRAS=test,dashboard,bench TESTS=tests/test_saebench.py
TESTS ?= tests
test-some: $(STAMP) lint
	$(OFFLINE) $(BIN)/python -P -m pytest -q -p no:cacheprovider $(TESTS)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/sae-lens-allocation demo --out out/demo

bench: $(STAMP)
	$(OFFLINE) $(BIN)/python benchmarks/allocation.py --quick

# The GPU machine has no network: everything a device run needs that its image lacks (torch, numpy,
# transformers, pandas, pyarrow, safetensors are there) travels in $(BUNDLE) with this package's
# wheel. Versions are the ones installed in $(BUNDLE_VENV): CI's training-only stack by default
# (transformers 5 and numpy 2, as on the device). For the CPU rehearsal (tests/test_gpu_run.py):
#   make gpu-bundle BUNDLE=gpu-bundle-local BUNDLE_VENV=.venv BUNDLE_PY=3.11
BUNDLE ?= gpu-bundle
BUNDLE_VENV ?= .venv-device
BUNDLE_PY ?= 3.12
BUNDLE_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
BUNDLE_MAX_MB ?= 48

gpu-bundle:
	test -f $(BUNDLE_VENV)/.installed || $(MAKE) env VENV=$(BUNDLE_VENV) EXTRAS=test PACKAGE=.
	rm -rf $(BUNDLE) && mkdir -p $(BUNDLE)
	$(BUNDLE_VENV)/bin/python benchmarks/bundle_pins.py --pure $(BUNDLE)/pure.txt --binary $(BUNDLE)/binary.txt
	# --no-deps: the pins are the whole closure already, and pip must never resolve torch.
	$(BUNDLE_VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: -d $(BUNDLE) \
	  --python-version $(BUNDLE_PY) $(addprefix --platform ,$(BUNDLE_PLATFORMS)) -r $(BUNDLE)/binary.txt
	# The others: their py3-none-any wheel, or one built here from an sdist.
	$(BUNDLE_VENV)/bin/python -m pip wheel -q --no-deps -w $(BUNDLE) -r $(BUNDLE)/pure.txt
	$(MAKE) gpu-bundle-wheel BUNDLE=$(BUNDLE) BUNDLE_VENV=$(BUNDLE_VENV)
	@size=$$(du -sm $(BUNDLE) | cut -f1); tree=$$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1); \
	  echo "$(BUNDLE): $$size MiB ($$(ls $(BUNDLE)/*.whl | wc -l) wheels), source tree $$tree MiB; carry limit 64 MiB"; \
	  test $$size -le $(BUNDLE_MAX_MB) || { echo "$(BUNDLE) exceeds $(BUNDLE_MAX_MB) MiB"; exit 1; }

# This package's wheel alone, rebuilt whenever the code changes (gpu_run.sh refuses a stale one).
gpu-bundle-wheel:
	rm -f $(BUNDLE)/sae_lens_allocation-*.whl
	$(BUNDLE_VENV)/bin/python -m pip wheel -q --no-deps --no-build-isolation -w $(BUNDLE) .

# The whole device command (docs/performance.md): the `run` tool's `bash benchmarks/gpu_run.sh`
# with carry ["gpu-bundle"]. Here it needs a CUDA build of torch on $(PYTHON).
gpu-check: gpu-bundle
	OUT=$${OUT:-benchmarks/results} PYTHON=$(PYTHON) bash benchmarks/gpu_run.sh

clean:
	rm -rf $(VENV) out

# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing
# on first use and reuse it afterwards (the stamp is rebuilt only when the set-up files change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
D3_JS := sae_lens_allocation/analysis/dashboard_assets/d3.v6.min.js
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: test demo env bench gpu-check clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first, from the pinned local wheel, so nothing below can pull a CUDA build.
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,dashboard]"
	# sae-dashboard -> decode-clt drags in CUDA-built torchvision/torchaudio, which break
	# `import transformers` next to a CPU torch. sae-dashboard never imports them.
	$(PIP) uninstall -y torchvision torchaudio
	# Dashboards inline d3 v6 so they render offline; it comes from the npm registry, here, once.
	test -s $(D3_JS) || ( \
	  { command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }; } && \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack d3@6 --silent >/dev/null && tar -xzf d3-6.*.tgz package/dist/d3.min.js) && \
	  mkdir -p $(dir $(D3_JS)) && cp "$$tmp/package/dist/d3.min.js" $(D3_JS) ) || \
	  echo "warning: could not fetch d3 v6 from the npm registry; dashboards cannot be written (docs/dashboards.md)"
	# Headless Chromium for the dashboard browser test (Debian's package, as root); without it the test skips.
	test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "warning: could not install chromium; the dashboard browser test will be skipped"
	touch $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -p no:cacheprovider tests

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

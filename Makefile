# Two entry points: `make demo` (the main job) and `make test`. Both build .venv from nothing
# on first use and reuse it afterwards (the stamp is rebuilt only when the set-up files change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: test demo env bench clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first, from the pinned local wheel, so nothing below can pull a CUDA build.
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,dashboard]"
	# sae-dashboard -> decode-clt drags in CUDA-built torchvision/torchaudio, which break
	# `import transformers` next to a CPU torch. sae-dashboard never imports them.
	$(PIP) uninstall -y torchvision torchaudio
	touch $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(OFFLINE) $(BIN)/sae-lens-allocation demo --out out/demo

bench: $(STAMP)
	$(OFFLINE) $(BIN)/python benchmarks/allocation.py

clean:
	rm -rf $(VENV) out

# Newcomers: `make demo` then `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch: an unpinned `torch` pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test lint demo render-demo bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(VENV)/.installed  ## create .venv and install the project with its test tools

# Installed once, and again when the project's declared dependencies change.
$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH)
	@# the build backend in .venv too: tests/test_install.py builds the package offline with it
	$(PIP) install --quiet "setuptools>=77,<85"
	$(PIP) install --quiet -e ".[capture,test]"
	@touch $@

test: install  ## run the test suite (CPU, offline)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: install  ## LatentMAS on the built-in tiny model, capture + heatmaps into charts/, an offline viewer page
	HF_HUB_OFFLINE=1 $(PY) run.py --method latent_mas --model_name tiny-qwen3 --task gsm8k \
		--max_samples 2 --max_new_tokens 256 --device cpu --show_heatmaps --show_heatmaps_singlelayer \
		--capture_file captures/demo.h5
	$(PY) -m latentmas view captures/demo.h5 --out charts/demo/viewer.html
	@echo "charts written to $(CURDIR)/charts/; open $(CURDIR)/charts/demo/viewer.html in a browser"

bench:  ## CPU benchmarks (render speed, capture overhead)
	$(PY) bench/render_speed.py
	$(PY) bench/capture_overhead.py

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs captures charts/*.png charts/*.svg charts/*.pdf

lint: install  ## ruff over the whole tree
	$(VENV)/bin/ruff check .

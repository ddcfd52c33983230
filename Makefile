# The two set-up commands: `make demo` and `make test`. Each creates .venv if needed and installs
# what it needs, so they work on a fresh machine with nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; a bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine: make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint format install install-test readers chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first (CPU wheel), so the package's `torch>=...` requirement installs nothing more.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/pip install --quiet "$(TORCH_SPEC)" || \
	  $(BIN)/pip install --quiet "$(TORCH_SPEC)" --extra-index-url $(TORCH_INDEX)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[faces]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The trainer-side readers tests/test_readers.py reads the dataset with, in a venv of their own:
# OpenCLIP's training reader imports torchvision, whose PyPI build needs PyTorch's CUDA build
# (about 6 GB, 2-3 minutes to install), which must not replace .venv's CPU torch.
READERS_VENV ?= .venv-readers
$(READERS_VENV)/.installed: tests/readers-requirements.txt
	$(PYTHON) -m venv $(READERS_VENV)
	$(READERS_VENV)/bin/pip install --quiet -r tests/readers-requirements.txt
	touch $@

readers: $(READERS_VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/laionface demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The report test renders the HTML in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "the report test needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

test: lint chromium readers
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache

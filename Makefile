# One target for each thing a developer does.
PYTHON ?= python3
VENV ?= .venv
REPO ?= model_repository
# Extra pip options, e.g. PIP_EXTRA='--extra-index-url https://download.pytorch.org/whl/cpu'
# so that torch comes as the small CPU build.
PIP_EXTRA ?=
BIN := $(VENV)/bin

.PHONY: setup export run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_EXTRA) -e '.[export,dev]'
	touch $@

export: setup
	$(BIN)/python -m model_defs.export --out $(REPO)

run: export
	MODEL_REPOSITORY=$(REPO) $(BIN)/python -m service

test: setup
	$(BIN)/pytest

clean:
	rm -rf $(VENV) $(REPO) .pytest_cache

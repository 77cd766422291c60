# One target for each thing a developer does.
PYTHON ?= python3
VENV ?= .venv
REPO ?= model_repository
# Extra pip options. By default torch comes from PyTorch's CPU wheel index (PyPI's Linux wheel is
# a CUDA build of several GB), unless PIP_FIND_LINKS already points pip at a local wheel folder.
PIP_EXTRA ?= $(if $(PIP_FIND_LINKS),,--extra-index-url https://download.pytorch.org/whl/cpu)
# `make docker`: the image name and what follows `--weights` in the image's export.
IMAGE ?= cnn-serve
WEIGHTS ?= imagenet --allow-random-fallback
BIN := $(VENV)/bin

.PHONY: setup export run test test-fast bench bench-compare bench-grpc bench-swap bench-count docs grpc-stubs lint lock clean docker docker-setup ci

setup: $(VENV)/.installed

# Everything: running, exporting, testing and benchmarking.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_EXTRA) -e '.[export,dev]'
	touch $@ $(VENV)/.runnable

# What `make run` needs and no more: the service and the exporter, not the test tools.
$(VENV)/.runnable: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_EXTRA) -e '.[export]'
	touch $@

export: $(VENV)/.runnable
	$(BIN)/python -m model_defs.export --out $(REPO)

run: export
	MODEL_REPOSITORY=$(REPO) $(BIN)/python -m service

# The whole suite, as CI runs it.
test: setup
	$(BIN)/pytest

# The edit loop: every test that needs no server process, torch export, Docker, browser or outside
# tool, and does not run full-size networks in PyTorch over and over (pyproject.toml's markers).
FAST = not e2e and not export and not container and not browser and not tool and not slow
test-fast: setup
	$(BIN)/pytest -q -m "$(FAST)"

# docs/settings.md's table, from the Settings fields; tests/test_docs.py fails until it is rewritten.
docs: setup
	$(BIN)/python -m docs.settings_page

# The gRPC stubs beside service/protocols/grpc/proto/*.proto; tests/test_grpc_codec.py checks them.
grpc-stubs: setup
	$(BIN)/python -m service.protocols.grpc.generate

# Lint (ruff) and types (mypy), as configured in pyproject.toml; CI runs this before the tests.
# Both run whatever the first finds, so one run lists every finding.
lint: setup
	$(BIN)/ruff check contract service model_defs bench tests; ruff=$$?; \
	$(BIN)/mypy contract service && exit $$ruff

# requirements.lock: the runtime image's packages, pinned with their hashes (the Dockerfile installs
# it with --require-hashes), resolved from pyproject.toml's runtime dependencies for the image's
# Python and platform. Keeps the pins that still fit; `make lock LOCK_ARGS=--upgrade` moves them all.
lock: setup
	$(BIN)/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" $(LOCK_ARGS) \
	    -o requirements.lock

# Service vs the plain FastAPI baseline and bare onnxruntime, every model, 1 and 16 clients.
bench: setup export
	$(BIN)/python -m bench --image tests/data/coffee.jpg --model-repository $(REPO) --baseline

# Server CPU per photo: one /compare of every model against one /predict per model.
bench-compare: setup export
	$(BIN)/python -m bench.compare --image tests/data/coffee.jpg --model-repository $(REPO)

# The Open Inference Protocol, the photo as BYTES: gRPC beside REST, server CPU and req/s per model.
bench-grpc: setup export
	$(BIN)/python -m bench --image tests/data/coffee.jpg --model-repository $(REPO) --protocol rest,grpc

# A version swap under 16 clients: p50/p99 before, during and after a repository load of version 2.
bench-swap: setup export
	$(BIN)/python -m bench.swap --image tests/data/coffee.jpg --model-repository $(REPO)

# The work per request counted, not timed: instructions under valgrind's callgrind (COUNT_ARGS: --server ...).
bench-count: setup export
	$(BIN)/python -m bench.count --image tests/data/coffee.jpg --model-repository $(REPO) $(COUNT_ARGS)

docker:
	docker build --build-arg WEIGHTS="$(WEIGHTS)" -t $(IMAGE) .

# A Docker engine, `docker compose` and the base image, on machines without them (root, Debian).
docker-setup:
	.ci/docker-setup.sh

ci:
	.ci/run

clean:
	rm -rf $(VENV) $(REPO) .pytest_cache

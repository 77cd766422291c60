# cnn-serve: export the CNNs to ONNX with PyTorch, then serve them with onnxruntime only.
#
#   docker build -t cnn-serve .                                  # ImageNet weights where published
#   docker build --build-arg WEIGHTS=random -t cnn-serve .       # offline: no checkpoint download
#   docker build --build-arg MODELS=mobilenetv3_large,effnet ... # a subset of the models
#
# Plain Dockerfile syntax (no BuildKit-only features), so the classic builder builds it too.

# Stage 1: the export stage's pip requirement list, read from pyproject.toml (the one place it is
# declared). The runtime stage installs requirements.lock instead.
FROM python:3.11-slim AS requirements
WORKDIR /requirements
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
open('export.txt', 'w').write('\n'.join(p['dependencies'] + p['optional-dependencies']['export']) + '\n')"

# Stage 2: PyTorch exports the model repository. Nothing of this stage but the repository
# reaches the final image.
FROM python:3.11-slim AS export
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# PyPI's default Linux torch wheel is a CUDA build of several GB; the export needs the CPU build.
# Replace these options to install from a mirror or a local wheel folder.
ARG PIP_EXTRA_ARGS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
COPY --from=requirements /requirements/export.txt /tmp/
RUN python -m pip install ${PIP_EXTRA_ARGS} -r /tmp/export.txt
WORKDIR /src
# The exporter writes metadata.json through the contract package.
COPY contract ./contract
COPY model_defs ./model_defs
# WEIGHTS is what follows `--weights`: `imagenet --allow-random-fallback` gives the four models
# with published torchvision checkpoints real ImageNet weights and the others random ones;
# `random` needs no download. MODELS is a comma-separated subset; empty means all.
ARG WEIGHTS="imagenet --allow-random-fallback"
ARG MODELS=""
# The same command the test suite runs (tests/conftest.py), recorded so a test can check it.
RUN set -- python -m model_defs.export --weights ${WEIGHTS} ${MODELS:+--models "$MODELS"} --out /models \
 && printf '%s\n' "$@" > /export-command.txt \
 && "$@" \
 && chmod -R a=rX /models

# Stage 3: the service. onnxruntime and the web stack, no torch: exactly the versions in
# requirements.lock, each file checked against its hash (`make lock` writes it from pyproject.toml).
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock /tmp/
RUN python -m pip install --require-hashes -r /tmp/requirements.lock && rm /tmp/requirements.lock
RUN groupadd --system --gid 10001 cnn-serve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cnn-serve
WORKDIR /app
# The service reads the model repository through the same contract package.
COPY contract ./contract
COPY service ./service
# Owned by root and without write bits: the service can read its models, never change them.
COPY --from=export /models /models
COPY --from=export /export-command.txt ./
ENV MODEL_REPOSITORY=/models HOST=0.0.0.0 PORT=8000
# Numeric: Kubernetes checks `runAsNonRoot` against the image's user only when it is a number.
USER 10001:10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=5s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('ADMIN_PORT', '8002'), timeout=2)"]
# Exec form: uvicorn is PID 1 and receives SIGTERM from `docker stop` directly.
CMD ["python", "-m", "service"]

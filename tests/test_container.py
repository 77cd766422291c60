"""The user's story with Docker, for real: build the image from the Dockerfile, `docker compose up`,
wait until healthy, upload a cat photo with curl's multipart form, compare the models at /metrics,
`docker compose down`.

Needs a Docker engine and the python:3.11-slim base image (`.ci/docker-setup.sh` provides both on
a machine without a registry). Outside CI the test skips when no engine answers; under CI
(CI=true) that is a failure. Weights are random because a build here cannot download checkpoints.
"""
import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import EXPORT_COMMAND, report

from tests.service_fixtures import free_port, metric_samples, unavailable

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "cnn-serve:test"
PROJECT = "cnn-serve-test"
MODELS = ["effnet", "mobilenetv1", "mobilenetv2", "mobilenetv3_large", "mobilenetv3_small",
          "shufflenetv1", "shufflenetv2"]
BUILD_TIMEOUT_S = 1800
WHEEL_PORT = 38541
HEALTHY_TIMEOUT_S = 240


def run(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def compose_command() -> list[str]:
    if shutil.which("docker") and run("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    unavailable("neither `docker compose` nor `docker-compose` is installed")


@pytest.fixture(scope="module")
def wheel_server() -> Iterator[list[str]]:
    """pip options for the export stage: serve the local wheel folder named by PIP_FIND_LINKS (if
    any) on 127.0.0.1, so a build without access to PyTorch's index finds the CPU torch wheel."""
    folder = os.environ.get("PIP_FIND_LINKS", "")
    if not os.path.isdir(folder):
        yield []  # the Dockerfile's default: PyTorch's CPU wheel index
        return
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    try:  # a fixed port keeps the build argument, and so Docker's layer cache, the same across runs
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ["--network", "host",
           "--build-arg", f"PIP_EXTRA_ARGS=--find-links http://127.0.0.1:{server.server_port}/"]
    server.shutdown()


@pytest.fixture(scope="module")
def image(request, wheel_server) -> str:
    if not shutil.which("docker") or run("docker", "info").returncode != 0:
        unavailable("no Docker engine answers `docker info` (run .ci/docker-setup.sh)")
    start = time.monotonic()
    build = run("docker", "build", "--build-arg", "WEIGHTS=random", *wheel_server, "-t", IMAGE, ".",
                timeout=BUILD_TIMEOUT_S, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert build.returncode == 0, f"docker build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    size = int(run("docker", "image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    report(request, "container", f"docker build: {time.monotonic() - start:.1f} s, runtime image {size / 1e6:.0f} MB")
    return IMAGE


@dataclass
class Stack:
    url: str
    compose: list[str]

    def exec(self, *args: str) -> subprocess.CompletedProcess:
        return run(*self.compose, "exec", "-T", "cnn-serve", *args)


@pytest.fixture(scope="module")
def stack(request, image) -> Iterator[Stack]:
    compose = [*compose_command(), "-p", PROJECT, "-f", "docker-compose.yml"]
    port = free_port()
    env = {**os.environ, "CNN_SERVE_IMAGE": image, "CNN_SERVE_ADDRESS": "127.0.0.1",
           "CNN_SERVE_PORT": str(port)}
    start = time.monotonic()
    up = run(*compose, "up", "-d", "--no-build", "cnn-serve", env=env)
    try:
        assert up.returncode == 0, f"compose up failed:\n{up.stderr}"
        container = run(*compose, "ps", "-q", "cnn-serve", env=env).stdout.strip()
        status = ""
        while time.monotonic() - start < HEALTHY_TIMEOUT_S:
            status = run("docker", "inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
            if status in ("healthy", "unhealthy"):
                break
            time.sleep(1)
        logs = run(*compose, "logs", "--no-color", "--tail", "60", env=env).stdout
        assert status == "healthy", f"container is {status!r} after {HEALTHY_TIMEOUT_S} s:\n{logs}"
        report(request, "container", f"compose up -> healthy: {time.monotonic() - start:.1f} s")
        yield Stack(url=f"http://127.0.0.1:{port}", compose=[*compose])
    finally:
        run(*compose, "down", "-t", "1", "-v", env=env)


def predict(stack: Stack, model: str, photo: Path) -> httpx.Response:
    # What `curl -F file=@chelsea.jpg localhost:8000/predict/<model>` sends.
    with photo.open("rb") as f:
        return httpx.post(f"{stack.url}/predict/{model}", files={"file": (photo.name, f, "image/jpeg")},
                          timeout=60)


def test_a_cat_photo_posted_to_mobilenetv3_large_comes_back_classified(stack, photos):
    response = predict(stack, "mobilenetv3_large", photos["chelsea"])

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "mobilenetv3_large"
    assert len(body["predictions"]) == 5
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1 + 1e-6


def test_every_model_in_the_image_is_listed_and_classifies_the_photo(stack, photos):
    listed = httpx.get(f"{stack.url}/models", timeout=10).json()["models"]
    assert sorted(m["name"] for m in listed) == MODELS
    assert all(m["status"] == "ready" for m in listed)

    for model in MODELS:
        response = predict(stack, model, photos["chelsea"])
        assert response.status_code == 200, f"{model}: {response.text}"
        body = response.json()
        assert body["model"] == model
        assert body["weights"]["kind"] == "random"  # the build argument reached the export
        assert len(body["predictions"]) == min(5, 10 if model == "effnet" else 1000)


def test_metrics_count_the_requests_of_every_model(stack, photos):
    for model in MODELS:
        assert predict(stack, model, photos["coffee"]).status_code == 200

    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    succeeded = {s.labels["model"] for s in metric_samples(text, "cnn_serve_requests_total", status="200")
                 if s.value >= 1}
    timed = {s.labels["model"] for s in metric_samples(text, "cnn_serve_stage_duration_seconds_count", stage="total")
             if s.value >= 1}
    assert succeeded == timed == set(MODELS)

    table = httpx.get(f"{stack.url}/metrics", params={"format": "table"}, timeout=10)
    assert table.status_code == 200
    assert all(model in table.text for model in MODELS)


def test_the_image_serves_the_comparison_page_and_its_assets(stack):
    page = httpx.get(f"{stack.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert httpx.get(f"{stack.url}{asset}", timeout=10).status_code == 200, asset


def test_the_container_runs_as_a_non_root_user_without_torch(stack):
    uid = stack.exec("id", "-u")
    assert uid.returncode == 0, uid.stderr
    assert uid.stdout.strip() != "0"

    torch = stack.exec("python", "-c", "import torch")
    assert torch.returncode != 0
    assert "No module named 'torch'" in torch.stderr


def test_the_model_repository_is_read_only_in_the_container(stack):
    write = stack.exec("python", "-c", "open('/models/mobilenetv3_large/model.onnx', 'ab')")
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr or "Permission denied" in write.stderr


def test_the_image_was_exported_with_the_test_suites_export_command(stack):
    recorded = stack.exec("cat", "/app/export-command.txt")
    assert recorded.returncode == 0, recorded.stderr
    interpreter, *args = recorded.stdout.splitlines()

    assert Path(interpreter).name.startswith("python")
    assert args == [*EXPORT_COMMAND[1:], "--out", "/models"]

"""Fixtures shared by the test suite, and the markers that sort it into tiers.

`model_repository` runs the same export command the Dockerfile runs, once per test session,
so every service test serves real ONNX files written by `model_defs`. `small_repository` is the
in-process tests' stand-in: two small classifiers written with onnx's helper API, without torch.

The markers (listed in pyproject.toml) say what a test needs beyond its own process. They are
applied here, from the fixtures a test uses and the file it is in, so a test is marked without
anyone remembering to; `make test-fast` runs the tests that need none of them and are not `slow`.
"""
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from tests.onnx_models import write_small_repository
from tests.service_fixtures import Server, ready_server

DATA = Path(__file__).parent / "data"
EXPORT_COMMAND = [sys.executable, "-m", "model_defs.export", "--weights", "random"]
EXPORT_CLI = EXPORT_COMMAND[:3]

# What using a fixture needs...
NEEDS_OF_FIXTURES = {
    "model_repository": ("export",),
    "run_export": ("export",),
    "served": ("e2e",),
}
# ...and what the tests of a file need, where they start a server process or an outside program in
# their own fixtures or bodies rather than through the fixtures above, or cost (`slow`).
NEEDS_OF_FILES = {
    "test_bench.py": ("e2e",),
    "test_compare.py": ("e2e",),
    "test_comparison_page.py": ("e2e", "browser"),
    "test_container.py": ("container", "export"),  # the image build runs the export
    "test_deploy.py": ("e2e", "container", "tool"),
    "test_hostile_connections.py": ("e2e",),
    "test_grpc.py": ("e2e",),
    "test_hostile_requests.py": ("e2e",),
    "test_keras_mobilenet.py": ("slow",),
    "test_kubernetes.py": ("tool",),
    "test_megvii_shufflenet.py": ("slow",),
    "test_model_defs_weights.py": ("slow",),
    "test_model_control.py": ("e2e",),
    "test_open_inference.py": ("e2e",),
    "test_reliability_access.py": ("e2e",),
    "test_reliability_overload.py": ("e2e",),
    "test_reliability_shutdown.py": ("e2e",),
    "test_service_api.py": ("e2e",),
    "test_tracing_export.py": ("e2e",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needs = set(NEEDS_OF_FILES.get(item.path.name, ()))
        for fixture in getattr(item, "fixturenames", ()):
            needs.update(NEEDS_OF_FIXTURES.get(fixture, ()))
        for need in sorted(needs):
            item.add_marker(need)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model_repository")
    subprocess.run([*EXPORT_COMMAND, "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def small_repository(tmp_path_factory) -> Path:
    """`small_imagenet` (1000 classes, 224 crop) and `small_cifar` (10 classes, 32 crop), ImageNet's
    and CIFAR's preprocessing: a repository for tests whose meaning is not the real networks'."""
    return write_small_repository(tmp_path_factory.mktemp("small_repository"))


@pytest.fixture(scope="session")
def run_export() -> Callable[..., subprocess.CompletedProcess]:
    """`python -m model_defs.export ARGS` as a user runs it, its output captured."""
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*EXPORT_CLI, *args], capture_output=True, text=True, timeout=600,
                              env=None if env is None else {**os.environ, **env})
    return run


@pytest.fixture(scope="module")
def served_repository(model_repository) -> Path:
    """The repository `served` copies models from; a module serving its own export overrides it."""
    return model_repository


@pytest.fixture(scope="module")
def served(served_repository, tmp_path_factory) -> Iterator[Callable[..., Server]]:
    """`served(models, **env)`: a ready `python -m service` over a copy of the named models of
    `served_repository` (every model when none is named), with the environment settings `env`.
    Each server runs until the module's tests are done."""
    with contextlib.ExitStack() as servers:
        def serve(models: Sequence[str] = (), **env: str) -> Server:
            folder = tmp_path_factory.mktemp("served")
            return servers.enter_context(ready_server(served_repository, folder, *models, **env))
        yield serve


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    """An HTTP client of the module's `server`."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATA.glob("*.jpg"))}


def report(request: pytest.FixtureRequest, tag: str, line: str) -> None:
    """Print a measurement past pytest's capture, so CI logs show it; measurements are printed,
    never asserted."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n[{tag}] {line}", flush=True)

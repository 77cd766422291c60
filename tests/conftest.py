"""Fixtures shared by the test suite.

`model_repository` runs the same export command the Dockerfile runs, once per test session,
so every service test serves real ONNX files written by `model_defs`.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
EXPORT_COMMAND = [sys.executable, "-m", "model_defs.export", "--weights", "random"]


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model_repository")
    subprocess.run([*EXPORT_COMMAND, "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATA.glob("*.jpg"))}


def required_tool(name: str) -> str:
    """The path of a command-line tool a test needs. Without it the test skips, saying so; under
    CI (CI=true) it fails, so a machine that lacks the tool cannot pass by skipping."""
    path = shutil.which(name)
    if path is None:
        reason = f"`{name}` is not installed (Debian: see .ci/run)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI needs {reason}")
        pytest.skip(reason)
    return path


def report(request: pytest.FixtureRequest, tag: str, line: str) -> None:
    """Print a measurement past pytest's capture, so CI logs show it; measurements are printed,
    never asserted."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n[{tag}] {line}", flush=True)

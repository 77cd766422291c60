"""Fixtures shared by the test suite.

`model_repository` runs the same export command the Dockerfile runs, once per test session,
so every service test serves real ONNX files written by `model_defs`.
"""
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


def report(request: pytest.FixtureRequest, tag: str, line: str) -> None:
    """Print a measurement past pytest's capture, so CI logs show it; measurements are printed,
    never asserted."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n[{tag}] {line}", flush=True)

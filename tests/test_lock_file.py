"""requirements.lock, from which the runtime image installs, is in step with pyproject.toml: every
runtime dependency is pinned there, with hashes, at a version its requirement admits."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\]+)", re.MULTILINE)


def locked() -> dict[str, str]:
    return {canonicalize_name(name): version
            for name, version in PIN.findall((ROOT / "requirements.lock").read_text())}


def test_every_runtime_dependency_is_locked_at_a_version_pyproject_admits():
    pins = locked()
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in runtime:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {requirement.name}=={pins[name]}, outside {line!r}: run `make lock`"


def test_every_locked_package_carries_a_hash():
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements.lock").read_text())
    packages = [block for block in blocks if PIN.match(block)]
    assert len(packages) == len(locked()) > 10
    assert all("--hash=sha256:" in block for block in packages)


def test_the_image_installs_the_runtime_from_the_lock_with_hashes_required():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install[^\n]*--require-hashes[^\n]*-r \S*requirements\.lock", dockerfile)

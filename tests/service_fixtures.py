"""Helpers for the service tests: image variants made from the test photos, a real server process,
and the values of its /metrics."""
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# The one implementation of these, shared with the bench; the tests import them from here
# (`as` names each one re-exported).
from bench.servers import ServerProcess as Server
from bench.servers import cpu_seconds as cpu_seconds
from bench.servers import free_port as free_port
from bench.servers import rss_bytes as rss_bytes
from bench.servers import running_service

# The contract's ImageNet preprocessing, written out here independently of the service.
IMAGENET = {"resize": 256, "interpolation": "bilinear", "crop": 224, "color": "RGB", "scale": 255.0,
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
ONE_GRAY_LEVEL = 1 / 255 / 0.229  # the largest step one 8-bit level makes after normalisation


def reference_tensor(image: Image.Image, p: dict = IMAGENET) -> np.ndarray:
    """docs/model-repository.md "Preprocessing, exactly", step by step, on an upright RGB image."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = p["resize"], int(p["resize"] * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize(size, Image.Resampling.BILINEAR)
    w, h = image.size
    top, left = round((h - p["crop"]) / 2), round((w - p["crop"]) / 2)
    image = image.crop((left, top, left + p["crop"], top + p["crop"]))
    x = (np.asarray(image, dtype=np.float32) / p["scale"] - np.array(p["mean"], np.float32)) \
        / np.array(p["std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def assert_matches_reference(tensor: np.ndarray, image: Image.Image, p: dict = IMAGENET,
                             differing: float = 0.001) -> None:
    """The service's tensor is the reference's but for crop-window rounding: at most one grey
    level, on under `differing` of the values (docs/model-repository.md)."""
    difference = np.abs(tensor - reference_tensor(image, p))
    assert difference.max() <= 1.01 / 255 / min(p["std"])
    assert (difference > 1e-5).mean() < differing


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def slow_png() -> bytes:
    """A 6000 x 6600 gradient (just under MAX_IMAGE_PIXELS): tens of KB to send, about a second
    to decode: a request still in flight while something else happens."""
    ramp = np.add.outer(np.arange(6600), np.arange(6000)) % 256
    return encode(Image.fromarray(ramp.astype(np.uint8), "L").convert("RGB"), "PNG", compress_level=9)


ROOT = Path(__file__).parent.parent


@contextmanager
def running_server(repository: Path, log: Path, **env: str) -> Iterator[Server]:
    """`python -m service` on a free loopback port, as a user starts it, from the checkout."""
    with running_service(repository, log, cwd=ROOT, **env) as server:
        yield server


@contextmanager
def ready_server(source: Path, folder: Path, *models: str, **env: str) -> Iterator[Server]:
    """A ready server on a copy of the named models of `source`, logging to folder/service.log."""
    repository = copy_repository(source, folder / "repository", *models)
    with running_server(repository, folder / "service.log", **env) as server:
        server.wait_ready()
        yield server


def logged(server: Server, pattern: str, timeout: float = 5.0) -> str:
    """The server's log once a line matches `pattern` (a regular expression), or as it is when
    `timeout` passes: a writer thread writes each line a moment after its answer is sent."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log.read_text(errors="replace")
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def copy_repository(source: Path, target: Path, *models: str) -> Path:
    """A copy of the repository at `source`, or of only the named model folders."""
    for name in models or [p.name for p in source.iterdir()]:
        shutil.copytree(source / name, target / name)
    return target


def metric_samples(text: str, name: str, **labels: str) -> list[Sample]:
    """The samples named `name` in Prometheus text whose labels include `labels`."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of `name` in Prometheus text, summed over the samples whose labels include
    `labels`; 0 when there is none (a labelled series appears only once it has counted)."""
    return sum(sample.value for sample in metric_samples(text, name, **labels))


def unavailable(reason: str) -> None:
    """Skip a test whose tool is missing here; under CI (CI=true) fail it: CI must run it."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs this test to run: {reason}")
    pytest.skip(reason)


def required_tool(*names: str) -> str:
    """The path of the first of `names` on PATH, or `unavailable`."""
    for name in names:
        if path := shutil.which(name):
            return path
    unavailable(f"`{' or '.join(names)}` is not installed (Debian: see .ci/run)")

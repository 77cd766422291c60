"""Helpers for the service tests: image variants made from the test photos, and a real server process."""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

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
    top, left = int(round((h - p["crop"]) / 2)), int(round((w - p["crop"]) / 2))
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service` on a free loopback port, as a user starts it."""

    def __init__(self, repository: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environment = {**os.environ, "MODEL_REPOSITORY": str(repository), "HOST": "127.0.0.1",
                       "PORT": str(self.port), **env}
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "service"], env=environment,
                                        cwd=Path(__file__).parent.parent,
                                        stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait_live(self, timeout: float = 30) -> None:
        self._wait(lambda r: r.status_code == 200, "/health/live", timeout)

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from process start until /health/ready said 200."""
        self._wait(lambda r: r.status_code == 200, "/health/ready", timeout)
        return time.perf_counter() - self.started

    def wait_loaded(self, timeout: float = 180) -> dict:
        """Readiness body once every model is loaded or failed (ready or not)."""
        return self._wait(lambda r: r.json().get("loading_done"), "/health/ready", timeout).json()

    def _wait(self, done, path: str, timeout: float) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited:\n{self.log.read_text()}"
            try:
                response = httpx.get(self.url + path, timeout=5)
                if done(response):
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} not done after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running_server(repository: Path, log: Path, **env: str):
    server = Server(repository, log, **env)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def ready_server(source: Path, folder: Path, *models: str, **env: str):
    """A ready server on a copy of the named models of `source`, logging to folder/service.log."""
    repository = copy_repository(source, folder / "repository", *models)
    with running_server(repository, folder / "service.log", **env) as server:
        server.wait_ready()
        yield server


def copy_repository(source: Path, target: Path, *models: str) -> Path:
    """A copy of the repository at `source`, or of only the named model folders."""
    for name in models or [p.name for p in source.iterdir()]:
        shutil.copytree(source / name, target / name)
    return target


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

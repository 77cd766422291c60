"""Bare onnxruntime: a model's file opened as the service would open it, and `session.run` timed
without a server around it, so a server's overhead reads as a ratio."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.load import percentile
from contract import ModelFolder, ModelMetadata, read_metadata
from service.engine import servable_onnx_file, session_options
from service.preprocess import preprocess
from service.settings import Settings

UNMEASURED_CALLS = 5


@dataclass(frozen=True)
class OpenModel:
    metadata: ModelMetadata
    file: Path
    session: ort.InferenceSession


def open_model(model_dir: Path, options: ort.SessionOptions) -> OpenModel:
    """The file the service would serve from `model_dir` (the contract's choice between the plain
    and the pre-optimised one), in a CPU session."""
    metadata = read_metadata(model_dir)
    file = model_dir / servable_onnx_file(ModelFolder(name=model_dir.name, path=model_dir,
                                                      metadata=metadata))
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return OpenModel(metadata, file, session)


@dataclass(frozen=True)
class BareRun:
    model: str
    model_file: str
    intra_op_threads: int
    runs: int
    p50_ms: float | None
    p90_ms: float | None
    preprocess_p50_ms: float | None


def bare_session_run(model_dir: Path, image: bytes, threads: int, runs: int,
                     time_limit: float) -> BareRun:
    """`session.run` at batch 1 on the photo, with the service's session options, and the photo's
    decode + preprocess, both on this process's one thread."""
    settings = Settings()
    model = open_model(model_dir, session_options(settings, threads))

    def prepare() -> np.ndarray:
        return preprocess(image, model.metadata.preprocessing, settings.max_image_pixels)

    feed = {model.metadata.input.name: prepare()}
    inference = timed(lambda: model.session.run(None, feed), runs, time_limit / 2)
    preprocessing = timed(prepare, runs, time_limit / 2)
    return BareRun(model=model_dir.name, model_file=model.file.name, intra_op_threads=threads,
                   runs=len(inference), p50_ms=percentile(inference, 50),
                   p90_ms=percentile(inference, 90), preprocess_p50_ms=percentile(preprocessing, 50))


def timed(call: Callable[[], object], runs: int, time_limit: float) -> list[float]:
    """Milliseconds of up to `runs` calls after a few unmeasured ones (the first runs pay for
    allocation and caches), within `time_limit` seconds."""
    for _ in range(UNMEASURED_CALLS):
        call()
    timings = []
    deadline = time.perf_counter() + time_limit
    while len(timings) < runs and time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        timings.append((time.perf_counter() - start) * 1000.0)
    return timings

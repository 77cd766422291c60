"""onnxruntime sessions for every model of the repository, and the one `infer` call that runs them.

Knows nothing of HTTP. Inference runs in a bounded thread pool of `inference_workers` threads, and
the time a request waits for a free worker is measured apart from the inference itself.

Threads: an inference that starts while no other runs gets the model's main session, with
`intra_op_threads` threads (all cores by default), so a lone request is as fast as the machine
allows. An inference that starts beside others gets the model's one-thread session instead: under
load the workers then use the cores one each, without the cost of splitting every small layer
across threads (a 2-thread MobileNetV3 inference costs about 1.5x the CPU of a 1-thread one).
At load both sessions are timed, and a model that more threads do not make at least 10 % faster
(EffNet) keeps only the one-thread session. onnxruntime's threads spin for work only while an
inference runs (`session.force_spinning_stop`).

Dynamic batching: each model has a `Batcher`. A request that finds one of the model's worker slots
free runs at once, alone. Requests that arrive while every slot is busy queue; when a slot frees,
the queued arrays (of the same shape, up to `max_batch_size` images) run as one batch and each
caller gets its own rows back. A lone request therefore never waits for a batch;
`max_queue_delay_ms` only lets already-queued requests wait a little longer for company.
"""
import asyncio
import ctypes
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from service.errors import InferenceFailed, ModelUnavailable, UnknownModel
from service.model_repository import ModelFolder, ModelLoadError, verify
from service.settings import Settings

log = logging.getLogger("service.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# After a burst, glibc keeps the freed activations of every inference thread's batches resident
# (150-250 MB here); once no inference has run for this long, they are handed back to the OS.
IDLE_TRIM_SECONDS = 1.0
THREAD_CHOICE_RUNS = 7  # timed runs per session when a model's lone-request threads are chosen
try:
    malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    malloc_trim = None


def servable_onnx_file(folder: ModelFolder) -> str:
    """The file to load: the contract allows the pre-optimised one only for the onnxruntime that wrote it."""
    meta = folder.metadata
    if meta.optimized_model_file and meta.export.get("onnxruntime") == ort.__version__ \
            and (folder.path / meta.optimized_model_file).is_file():
        return meta.optimized_model_file
    return meta.model_file


def session_options(settings: Settings, threads: int) -> ort.SessionOptions:
    """How the service runs onnxruntime; the bench times bare session.run with the same options."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.enable_cpu_mem_arena = settings.cpu_memory_arena
    # Threads that sleep between the layers of one inference pay a wake-up per layer; threads that
    # spin between inferences burn the core that decodes the next image. So: spin while a run is
    # active, and stop the moment it returns.
    spinning = "1" if settings.intra_op_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


@dataclass
class LoadedModel:
    folder: ModelFolder
    status: Literal["loading", "ready", "failed"] = "loading"
    error: str | None = None
    session: ort.InferenceSession | None = None  # `threads` threads: for a lone inference
    # One thread, for an inference that starts beside others; None when `session` serves all.
    one_thread_session: ort.InferenceSession | None = None
    threads: int | None = None  # of `session`
    execution_provider: str | None = None
    onnx_file: str | None = None
    load_ms: float | None = None
    warmup_ms: float | None = None

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass(frozen=True)
class Inference:
    outputs: np.ndarray  # (batch, classes)
    queue_ms: float
    inference_ms: float
    batch_size: int
    threads: int  # onnxruntime threads the inference ran on


class Engine:
    def __init__(self, folders: list[ModelFolder], settings: Settings,
                 on_batch: Callable[[str, int], None] | None = None) -> None:
        self.settings = settings
        self.models = {f.name: LoadedModel(f) for f in folders}
        self.workers = settings.resolved_inference_workers
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self._on_batch = on_batch or (lambda model, size: None)
        self._batchers: dict[str, Batcher] = {}
        self.running = 0  # inferences running now, across all models
        self._trim_timer: asyncio.TimerHandle | None = None
        self.loading_done = False
        if self.workers > settings.cores:
            log.warning("%d inference workers oversubscribe %d cores", self.workers, settings.cores)

    # Start-up -----------------------------------------------------------------------------
    def load_all(self) -> None:
        """Create and warm every session, one model at a time; a failure stops only that model."""
        for model in self.models.values():
            try:
                self._load(model)
            except ModelLoadError as exc:
                model.status, model.error = "failed", str(exc)
            except Exception as exc:  # onnxruntime raises its own types for broken graphs
                model.status, model.error = "failed", f"{type(exc).__name__}: {exc}"
            if model.status == "failed":
                log.error("model %s failed to load: %s", model.name, model.error)
            else:
                log.info("model %s ready on %s: load %.0f ms, warm-up %.0f ms", model.name,
                         model.execution_provider, model.load_ms, model.warmup_ms)
        self.loading_done = True

    def _load(self, model: LoadedModel) -> None:
        started = time.perf_counter()
        verify(model.folder)
        meta = model.folder.metadata
        onnx_file = servable_onnx_file(model.folder)
        threads = self.settings.intra_op_threads
        model.session = self._session(model.folder.path / onnx_file, threads)
        self._check_signature(model)
        model.onnx_file = onnx_file
        model.execution_provider = model.session.get_providers()[0]
        # With one worker every inference runs alone; on a GPU the CPU threads hardly matter.
        if threads > 1 and self.workers > 1 and model.execution_provider == CPU:
            model.one_thread_session = self._session(model.folder.path / onnx_file, 1)
        model.load_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        shape = [1 if d is None else d for d in meta.input.shape]
        zeros = np.zeros(shape, dtype=np.float32)
        for _ in range(self.settings.warmup_runs):
            self.run(model, zeros)
            if model.one_thread_session is not None:
                self.run(model, zeros, alone=False)
        model.threads = threads
        if model.one_thread_session is not None and not self._more_threads_win(model, zeros):
            model.session, model.one_thread_session, model.threads = model.one_thread_session, None, 1
        model.warmup_ms = (time.perf_counter() - started) * 1000
        model.status = "ready"

    def _more_threads_win(self, model: LoadedModel, x: np.ndarray) -> bool:
        """Whether all threads run this model at least 10 % faster than one; for a model as small
        as EffNet they are slower, and then a lone request runs on one thread too."""
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(THREAD_CHOICE_RUNS):
            for alone in times:
                started = time.perf_counter()
                self.run(model, x, alone)
                times[alone].append(time.perf_counter() - started)
        wide, narrow = (float(np.median(times[alone])) * 1000 for alone in (True, False))
        wins = wide < 0.9 * narrow
        log.info("model %s: %.2f ms on %d threads, %.2f ms on 1 at batch 1; a lone request uses %s",
                 model.name, wide, model.threads, narrow, "all" if wins else "1")
        return wins

    def _session(self, path: Path, threads: int) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), sess_options=session_options(self.settings, threads),
                                    providers=self._providers())

    def _providers(self) -> list[str]:
        if self.settings.execution_provider == "cuda":
            if CUDA in ort.get_available_providers():
                return [CUDA, CPU]
            log.warning("EXECUTION_PROVIDER=cuda but onnxruntime has no CUDA provider; using CPU")
        return [CPU]

    @staticmethod
    def _check_signature(model: LoadedModel) -> None:
        meta = model.folder.metadata
        inputs = [i.name for i in model.session.get_inputs()]
        outputs = [o.name for o in model.session.get_outputs()]
        if inputs != [meta.input.name] or meta.output.name not in outputs:
            raise ModelLoadError(f"graph has inputs {inputs} and outputs {outputs}; metadata says "
                                 f"{meta.input.name!r} -> {meta.output.name!r}")

    # Serving ------------------------------------------------------------------------------
    def model(self, name: str) -> LoadedModel:
        """The named model if it can serve; UnknownModel or ModelUnavailable otherwise."""
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(name, sorted(self.models))
        if model.status != "ready":
            raise ModelUnavailable(name, model.status, model.error)
        return model

    def is_ready(self, strict: bool) -> bool:
        """Loading is over, some model serves and, when strict, none failed."""
        statuses = [m.status for m in self.models.values()]
        return self.loading_done and "ready" in statuses and not (strict and "failed" in statuses)

    @staticmethod
    def run(model: LoadedModel, batch: np.ndarray, alone: bool = True) -> np.ndarray:
        """One bare session.run on the caller's thread, on the one-thread session unless alone."""
        meta = model.folder.metadata
        session = model.session if alone else model.one_thread_session
        return session.run([meta.output.name], {meta.input.name: batch})[0]

    async def infer(self, name: str, batch: np.ndarray) -> Inference:
        """Run a (batch, 3, H, W) array through the named model without blocking the event loop."""
        model = self.model(name)
        batcher = self._batchers.get(name)
        if batcher is None:
            batcher = self._batchers[name] = Batcher(self, model)
        return await batcher.submit(batch)

    def _inference_started(self) -> None:
        self.running += 1
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None

    def _inference_finished(self) -> None:
        self.running -= 1
        if self.running == 0 and malloc_trim is not None:
            loop = asyncio.get_running_loop()
            # On the loop's default pool, so that no inference waits behind the trim.
            self._trim_timer = loop.call_later(
                IDLE_TRIM_SECONDS, lambda: loop.run_in_executor(None, malloc_trim, 0))

    def close(self) -> None:
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        for batcher in self._batchers.values():
            batcher.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Request:
    batch: np.ndarray
    answer: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """One model's queue: run at once when a slot is free, else batch what queued meanwhile.

    Lives on the event loop, so its state needs no lock; only `session.run` leaves the loop.
    """

    def __init__(self, engine: Engine, model: LoadedModel) -> None:
        self.engine, self.model = engine, model
        self.slots = engine.workers
        self.max_batch_size = engine.settings.max_batch_size
        self.max_delay_s = engine.settings.max_queue_delay_ms / 1000
        self.running = 0
        self.queue: list[_Request] = []
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, batch: np.ndarray) -> Inference:
        request = _Request(batch, asyncio.get_running_loop().create_future())
        self.queue.append(request)
        self._dispatch(idle=self.running < self.slots and len(self.queue) == 1)
        return await request.answer

    def _dispatch(self, idle: bool = False) -> None:
        while self.running < self.slots and self.queue:
            if not idle and not self._worth_running_now():
                return
            idle = False
            self._start(self._take())

    def _worth_running_now(self) -> bool:
        """A queued batch runs when it is full or its oldest request has waited max_queue_delay."""
        waited = time.perf_counter() - self.queue[0].submitted
        if self.max_delay_s <= waited or sum(r.batch.shape[0] for r in self.queue) >= self.max_batch_size:
            return True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s - waited, self._on_timer)
        return False

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take(self) -> list[_Request]:
        """The oldest request and the queued ones of its shape that fit beside it."""
        first = self.queue[0]
        taken, rows, kept = [first], first.batch.shape[0], []
        for request in self.queue[1:]:
            fits = rows + request.batch.shape[0] <= self.max_batch_size
            if fits and request.batch.shape[1:] == first.batch.shape[1:] \
                    and request.batch.dtype == first.batch.dtype:
                taken.append(request)
                rows += request.batch.shape[0]
            else:
                kept.append(request)
        self.queue = kept
        return taken

    def _start(self, requests: list[_Request]) -> None:
        alone = self.engine.running == 0 or self.model.one_thread_session is None
        threads = self.model.threads if alone else 1
        self.running += 1
        self.engine._inference_started()
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self.engine._executor, self._run, requests, alone)
        running.add_done_callback(lambda done: self._finish(requests, done, threads))

    def _run(self, requests: list[_Request], alone: bool) -> tuple[float, float, np.ndarray]:
        started = time.perf_counter()
        arrays = [r.batch for r in requests]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        outputs = self.engine.run(self.model, batch, alone)
        return started, time.perf_counter(), outputs

    def _finish(self, requests: list[_Request], done: asyncio.Future, threads: int) -> None:
        self.running -= 1
        self.engine._inference_finished()
        try:
            started, finished, outputs = done.result()
        except (Exception, asyncio.CancelledError) as exc:  # onnxruntime's errors, or shut down
            error = InferenceFailed(self.model.name, f"{type(exc).__name__}: {exc}")
            for request in requests:
                if not request.answer.done():
                    request.answer.set_exception(error)
        else:
            size = sum(r.batch.shape[0] for r in requests)
            self.engine._on_batch(self.model.name, size)
            row = 0
            for request in requests:
                rows = request.batch.shape[0]
                if not request.answer.done():  # the caller may have gone away
                    request.answer.set_result(Inference(
                        outputs[row:row + rows], (started - request.submitted) * 1000,
                        (finished - started) * 1000, size, threads))
                row += rows
        self._dispatch()

    def cancel(self) -> None:
        for request in self.queue:
            request.answer.cancel()
        self.queue = []

"""onnxruntime sessions for every model of the repository, and the one `infer` call that runs them.

Knows nothing of HTTP. Inference runs in a bounded thread pool of `inference_workers` threads, and
the time a request waits for a free worker is measured apart from the inference itself.

Threads: an inference that starts while no other runs gets the model's main session, with
`intra_op_threads` threads (all cores by default), so a lone request is as fast as the machine
allows. An inference that starts beside others gets the model's one-thread session instead: under
load the workers then use the cores one each, without the cost of splitting every small layer
across threads. At load both sessions are timed, and a model that more threads do not make at
least 10 % faster keeps only the one-thread session. onnxruntime's threads spin for work only while
an inference runs (`session.force_spinning_stop`).

A model's state is decided once: `loading`, then `ready` with its `ServedModel` (sessions, threads,
labels, timings; immutable from then on) or `failed` with the reason. Batching is `service.batching`.
"""
import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract import ModelFolder, ModelLoadError, ModelMetadata, ModelStatus, verify
from service.batching import Activity, Batcher, Inference, Job
from service.errors import ModelUnavailable, UnknownModel
from service.settings import Settings

log = logging.getLogger("service.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# After a burst, glibc keeps the freed activations of every inference thread's batches resident;
# once no inference has run for this long, they are handed back to the OS (`trim`).
IDLE_TRIM_SECONDS = 1.0
THREAD_CHOICE_RUNS = 7  # timed runs per session when a model's lone-request threads are chosen
MORE_THREADS_MUST_SAVE = 0.1  # all threads serve a lone request only if at least this much faster
__all__ = ["Engine", "Inference", "ModelState", "ServedModel", "servable_onnx_file",
           "session_options", "more_threads_win"]


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


def more_threads_win(wide_ms: float, narrow_ms: float) -> bool:
    """Whether a lone request should run on all threads, from the median times of both sessions."""
    return wide_ms < (1 - MORE_THREADS_MUST_SAVE) * narrow_ms


@dataclass(frozen=True)
class ServedModel:
    """A loaded, warmed model: everything decided at load, nothing changed afterwards."""

    folder: ModelFolder
    labels: tuple[str, ...]
    session: ort.InferenceSession  # `threads` threads: for a lone inference
    # One thread, for an inference that starts beside others; None when `session` serves all.
    one_thread_session: ort.InferenceSession | None
    threads: int
    execution_provider: str
    onnx_file: str
    load_ms: float
    warmup_ms: float

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def metadata(self) -> ModelMetadata:
        return self.folder.metadata

    def run(self, batch: np.ndarray, alone: bool = True) -> np.ndarray:
        """One bare session.run on the caller's thread, on the one-thread session unless alone."""
        session = self.session if alone or self.one_thread_session is None else self.one_thread_session
        return session.run([self.metadata.output.name], {self.metadata.input.name: batch})[0]


@dataclass(frozen=True)
class ModelState:
    """Where a model of the repository stands; replaced whole when that changes."""

    folder: ModelFolder
    status: ModelStatus = "loading"
    error: str | None = None
    served: ServedModel | None = None

    @property
    def name(self) -> str:
        return self.folder.name


class Engine:
    def __init__(self, folders: list[ModelFolder], settings: Settings,
                 on_batch: Callable[[str, int], None] | None = None,
                 trim: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.models: dict[str, ModelState] = {f.name: ModelState(f) for f in folders}
        self.workers = settings.resolved_inference_workers
        self.loading_done = False
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self._on_batch = on_batch or (lambda model, size: None)
        self._trim = trim
        self._batchers: dict[str, Batcher] = {}
        self._activity = Activity(on_busy=self._cancel_trim, on_idle=self._schedule_trim)
        self._trim_timer: asyncio.TimerHandle | None = None
        if self.workers > settings.cores:
            log.warning("%d inference workers oversubscribe %d cores", self.workers, settings.cores)

    # Start-up -----------------------------------------------------------------------------
    def load_all(self) -> None:
        """Create and warm every session, one model at a time; a failure stops only that model."""
        for name, state in self.models.items():
            try:
                served = self._load(state.folder)
            except ModelLoadError as exc:
                self.models[name] = dataclasses.replace(state, status="failed", error=str(exc))
            except Exception as exc:  # onnxruntime raises its own types for broken graphs
                self.models[name] = dataclasses.replace(state, status="failed",
                                                        error=f"{type(exc).__name__}: {exc}")
            else:
                self.models[name] = dataclasses.replace(state, status="ready", served=served)
                log.info("model %s ready on %s: load %.0f ms, warm-up %.0f ms", name,
                         served.execution_provider, served.load_ms, served.warmup_ms)
            if self.models[name].status == "failed":
                log.error("model %s failed to load: %s", name, self.models[name].error)
        self.loading_done = True

    def _load(self, folder: ModelFolder) -> ServedModel:
        started = time.perf_counter()
        labels = verify(folder)
        onnx_file = servable_onnx_file(folder)
        threads = self.settings.intra_op_threads
        session = self._session(folder.path / onnx_file, threads)
        _check_signature(session, folder.metadata)
        provider = session.get_providers()[0]
        # With one worker every inference runs alone; on a GPU the CPU threads hardly matter.
        one_thread = None
        if threads > 1 and self.workers > 1 and provider == CPU:
            one_thread = self._session(folder.path / onnx_file, 1)
        model = ServedModel(folder, tuple(labels), session, one_thread, threads, provider, onnx_file,
                            load_ms=(time.perf_counter() - started) * 1000, warmup_ms=0.0)
        started = time.perf_counter()
        zeros = np.zeros([1 if d is None else d for d in folder.metadata.input.shape], np.float32)
        for _ in range(self.settings.warmup_runs):
            model.run(zeros)
            if one_thread is not None:
                model.run(zeros, alone=False)
        if one_thread is not None and not self._more_threads_win(model, zeros):
            model = dataclasses.replace(model, session=one_thread, one_thread_session=None, threads=1)
        return dataclasses.replace(model, warmup_ms=(time.perf_counter() - started) * 1000)

    @staticmethod
    def _more_threads_win(model: ServedModel, x: np.ndarray) -> bool:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(THREAD_CHOICE_RUNS):
            for alone in times:
                started = time.perf_counter()
                model.run(x, alone)
                times[alone].append(time.perf_counter() - started)
        wide, narrow = (float(np.median(times[alone])) * 1000 for alone in (True, False))
        wins = more_threads_win(wide, narrow)
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

    # Serving ------------------------------------------------------------------------------
    def model(self, name: str) -> ServedModel:
        """The named model if it can serve; UnknownModel or ModelUnavailable otherwise."""
        state = self.models.get(name)
        if state is None:
            raise UnknownModel(name, sorted(self.models))
        if state.served is None:
            raise ModelUnavailable(name, state.status, state.error)
        return state.served

    def is_ready(self, strict: bool) -> bool:
        """Loading is over, some model serves and, when strict, none failed."""
        statuses = [m.status for m in self.models.values()]
        return self.loading_done and "ready" in statuses and not (strict and "failed" in statuses)

    def idle(self, model: ServedModel) -> bool:
        """Whether an inference of this model submitted now would start at once and run alone.

        Only then does a request's decoding belong on the inference worker: under load the
        preprocessing pool decodes while the workers infer, and queued requests can batch."""
        return self._activity.running == 0 and self._batcher(model).idle

    async def infer(self, model: ServedModel, job: Job) -> Inference:
        """Run a (batch, 3, H, W) array, or a function making one, without blocking the loop."""
        return await self._batcher(model).submit(job)

    def _batcher(self, model: ServedModel) -> Batcher:
        batcher = self._batchers.get(model.name)
        if batcher is None:
            batcher = self._batchers[model.name] = Batcher(
                model.name, model.run, self._executor, self._activity, self.workers,
                self.settings.max_batch_size, self.settings.max_queue_delay_ms / 1000,
                model.threads, model.one_thread_session is not None, self._on_batch)
        return batcher

    def _cancel_trim(self) -> None:
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None

    def _schedule_trim(self) -> None:
        if self._trim is not None:
            self._trim_timer = asyncio.get_running_loop().call_later(IDLE_TRIM_SECONDS, self._trim)

    def close(self) -> None:
        self._cancel_trim()
        for batcher in self._batchers.values():
            batcher.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _check_signature(session: ort.InferenceSession, meta: ModelMetadata) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [meta.input.name] or meta.output.name not in outputs:
        raise ModelLoadError(f"graph has inputs {inputs} and outputs {outputs}; metadata says "
                             f"{meta.input.name!r} -> {meta.output.name!r}")

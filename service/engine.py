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

Every version of a model has a `ModelState`, replaced whole when it changes: `loading`, then
`ready` with its `ServedModel` (sessions, threads, labels, timings; immutable) or `failed` with the
reason, or `unavailable` (not loaded: unloaded, evicted, or its files still being copied in). A
request without a version gets the newest ready one. A version is loaded and warmed beside the one
serving; only then is it swapped in. Requests admitted on the old one finish on it: each holds its
`ServedModel`, whose batcher goes once the last of them is done, and its sessions with it.
A failed reload keeps the old version serving and records the reason.

With `MAX_LOADED_MODELS`, a request for a model that is not loaded loads it (one load however many
requests wait for it) after unloading the least recently used model that no request is using.
Batching is `service.batching`; which versions to load and when is `service.model_control`.
"""
import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract import IncompleteModel, ModelFolder, ModelLoadError, ModelMetadata, ModelStatus, fingerprint, verify
from service.batching import Activity, Batcher, Inference, Job
from service.errors import ModelUnavailable, UnknownModel, UnknownModelVersion
from service.settings import Settings

log = logging.getLogger("service.engine")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# After a burst, glibc keeps the freed activations of every inference thread's batches resident;
# once no inference has run for this long, they are handed back to the OS (`trim`).
IDLE_TRIM_SECONDS = 1.0
EVICTION_WAIT_SECONDS = 0.01  # how often a load waiting for a model to fall idle looks again
THREAD_CHOICE_RUNS = 7  # timed runs per session when a model's lone-request threads are chosen
MORE_THREADS_MUST_SAVE = 0.1  # all threads serve a lone request only if at least this much faster
__all__ = ["Engine", "Inference", "ModelState", "ServedModel", "servable_onnx_file",
           "session_options", "more_threads_win", "version_number"]
LoadListener = Callable[[str, str, float, str], None]  # model, version, seconds, outcome
UnloadListener = Callable[[str, str, str], None]  # model, version, why
ForgetListener = Callable[[str, str], None]  # model, version: gone from the index


def loadable_metadata(folder: ModelFolder) -> ModelMetadata:
    """A folder's metadata; ModelLoadError saying why when its metadata.json could not be read."""
    if folder.metadata is None:
        raise ModelLoadError(folder.error or f"{folder.path}: no readable metadata.json")
    return folder.metadata


def servable_onnx_file(folder: ModelFolder) -> str:
    """The file to load: the contract allows the pre-optimised one only for the onnxruntime that wrote it."""
    meta = loadable_metadata(folder)
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
    def version(self) -> str:
        return self.folder.version

    @property
    def metadata(self) -> ModelMetadata:
        return loadable_metadata(self.folder)  # it loaded, so it has metadata

    @functools.cached_property
    def longest_label_bytes(self) -> int:
        """The longest label in UTF-8: an answer naming classes is sized by it before inference."""
        return max((len(label.encode()) for label in self.labels), default=0)

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
    fingerprint: tuple = ()  # of the files `served` (or the failure) came from
    on_demand: bool = False  # not loaded to stay within MAX_LOADED_MODELS: a request loads it
    incomplete: bool = False  # files still being copied in: tried again at the next scan

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def version(self) -> str:
        return self.folder.version


def version_number(version: str) -> int:
    """Versions order numerically; a folder name that is not a number comes before them all."""
    return int(version) if version.isdecimal() else -1


def newest(states: list[ModelState]) -> ModelState:
    return max(states, key=lambda state: version_number(state.version))


def headline(states: dict[str, ModelState]) -> ModelState:
    """A model's headline state: its newest ready version, or else its newest version."""
    return newest([s for s in states.values() if s.served] or list(states.values()))


class Engine:
    def __init__(self, folders: list[ModelFolder], settings: Settings,
                 on_batch: Callable[[str, int], None] | None = None,
                 trim: Callable[[], None] | None = None,
                 on_load: LoadListener | None = None, on_unload: UnloadListener | None = None,
                 on_forget: ForgetListener | None = None) -> None:
        self.settings = settings
        self.versions: dict[str, dict[str, ModelState]] = {}  # model name -> version -> state
        self.register(folders)
        self.workers = settings.resolved_inference_workers
        self.loading_done = False
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="inference")
        self._on_batch = on_batch or (lambda model, size: None)
        self._trim = trim
        self._on_load = on_load or (lambda model, version, seconds, outcome: None)
        self._on_unload = on_unload or (lambda model, version, why: None)
        self._on_forget = on_forget or (lambda model, version: None)
        self._batchers: dict[int, Batcher] = {}  # by id() of the ServedModel they run
        self._in_use: dict[int, int] = {}  # id() of a ServedModel -> requests holding it
        self._retired: set[int] = set()  # swapped out or unloaded, still finishing requests
        self._last_used: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one load or unload of a model at a time
        self._activity = Activity(on_busy=self._cancel_trim, on_idle=self._schedule_trim)
        self._trim_timer: asyncio.TimerHandle | None = None
        if self.workers > settings.cores:
            log.warning("%d inference workers oversubscribe %d cores", self.workers, settings.cores)

    def register(self, folders: list[ModelFolder]) -> None:
        """Know these folders' models and versions, none of them loaded yet."""
        for folder in folders:
            self.versions.setdefault(folder.name, {})[folder.version] = ModelState(folder)

    @property
    def models(self) -> dict[str, ModelState]:
        """Each model's headline state (`headline`)."""
        return {name: headline(states) for name, states in self.versions.items() if states}

    # Start-up -----------------------------------------------------------------------------
    def load_all(self, names: set[str] | None = None) -> None:
        """Create and warm the sessions of every version (of the named models only, when given, and
        of the first MAX_LOADED_MODELS models at most), one at a time; a failure stops only that
        version."""
        bound = self.settings.max_loaded_models or len(self.versions)
        loaded = 0
        for name, states in self.versions.items():
            if names is not None and name not in names:
                self._mark(name, "not loaded at start (STARTUP_MODELS); load it through the "
                                 "repository API", on_demand=False)
            elif loaded >= bound:
                self._mark(name, "not loaded (MAX_LOADED_MODELS): loads on its first request",
                           on_demand=True)
            else:
                loaded += 1
                for version, state in list(states.items()):
                    states[version] = self._loaded(state, state.folder)
        self.loading_done = True

    def _mark(self, name: str, reason: str, on_demand: bool) -> None:
        for version, state in self.versions[name].items():
            self.versions[name][version] = ModelState(state.folder, "unavailable", reason,
                                                      on_demand=on_demand)

    def _loaded(self, current: ModelState, folder: ModelFolder) -> ModelState:
        """The state after loading `folder` in place of `current` (blocking: run off the loop)."""
        started, prints = time.perf_counter(), fingerprint(folder)
        keep = current.served  # what serves until the new files have loaded and warmed up
        try:
            served = self._load(folder)
        except IncompleteModel as exc:
            state = ModelState(folder, "ready" if keep else "unavailable",
                               f"waiting for its files, tried again at the next scan: {exc}",
                               keep, current.fingerprint if keep else prints, incomplete=True)
            outcome = "incomplete"
        except Exception as exc:  # ModelLoadError, or onnxruntime's own types for broken graphs
            reason = str(exc) if isinstance(exc, ModelLoadError) else \
                f"session check: {type(exc).__name__}: {exc}"
            state = ModelState(folder, "ready" if keep else "failed",
                               f"version {folder.version}: {reason}", keep, prints)
            outcome = "failed"
        else:
            state, outcome = ModelState(folder, "ready", served=served, fingerprint=prints), "loaded"
            log.info("model %s version %s ready on %s: load %.0f ms, warm-up %.0f ms", folder.name,
                     folder.version, served.execution_provider, served.load_ms, served.warmup_ms)
        if outcome != "loaded":
            log.error("model %s version %s not loaded: %s%s", folder.name, folder.version, state.error,
                      "; the loaded files keep serving" if keep else "")
        self._on_load(folder.name, folder.version, time.perf_counter() - started, outcome)
        return state

    def _load(self, folder: ModelFolder) -> ServedModel:
        started = time.perf_counter()
        labels = verify(folder)
        onnx_file = servable_onnx_file(folder)
        threads = self.settings.intra_op_threads
        session = self._session(folder.path / onnx_file, threads)
        metadata = loadable_metadata(folder)
        _check_signature(session, metadata)
        provider = session.get_providers()[0]
        # With one worker every inference runs alone; on a GPU the CPU threads hardly matter.
        one_thread = None
        if threads > 1 and self.workers > 1 and provider == CPU:
            one_thread = self._session(folder.path / onnx_file, 1)
        model = ServedModel(folder, tuple(labels), session, one_thread, threads, provider, onnx_file,
                            load_ms=(time.perf_counter() - started) * 1000, warmup_ms=0.0)
        started = time.perf_counter()
        zeros = np.zeros([1 if d is None else d for d in metadata.input.shape], np.float32)
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
    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The named model (its newest ready version, or `version`) if it can serve;
        UnknownModel, UnknownModelVersion or ModelUnavailable otherwise."""
        states = self.versions.get(name)
        if not states:
            raise UnknownModel(name, sorted(n for n, s in self.versions.items() if s))
        if version is not None and version not in states:
            raise UnknownModelVersion(name, version, sorted(states, key=version_number))
        state = states[version] if version is not None else headline(states)  # not every model's
        if state.served is None:
            raise ModelUnavailable(name, state.status, state.error)
        self._last_used[name] = time.monotonic()
        return state.served

    def serves(self, name: str, version: str | None = None) -> bool:
        """Whether `model(name, version)` would answer now. Asking is no use of the model: a
        readiness probe does not keep it from being evicted."""
        states = self.versions.get(name, {})
        if version is None:
            return any(state.served for state in states.values())
        return version in states and states[version].served is not None

    async def acquire(self, name: str, version: str | None = None) -> tuple[ServedModel, float]:
        """The model to serve, loaded first when MAX_LOADED_MODELS left it out, and the ms that
        load took (0 when it was loaded)."""
        try:
            return self.model(name, version), 0.0
        except ModelUnavailable:
            cold = [s.folder for s in self.versions[name].values() if s.on_demand]
            if not cold:
                raise
        started = time.perf_counter()
        await self.load(name, cold)
        return self.model(name, version), (time.perf_counter() - started) * 1000

    @contextlib.asynccontextmanager
    async def in_use(self, model: ServedModel) -> AsyncIterator[None]:
        """Hold `model` for a request: it is not evicted meanwhile, and once retired its batcher
        goes with the last request holding it."""
        key = id(model)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            yield
        finally:
            self._in_use[key] -= 1
            if not self._in_use[key]:
                del self._in_use[key]
                if key in self._retired:
                    self._release(key)

    # Loading and unloading ------------------------------------------------------------------
    def needs_load(self, folder: ModelFolder, eager: bool) -> bool:
        """Whether `folder` differs from what is loaded; `eager` also loads what was left out
        (unloaded, evicted, failed with the same files)."""
        current = self.versions.get(folder.name, {}).get(folder.version)
        if current is None or current.incomplete or current.fingerprint != fingerprint(folder):
            return True
        return current.served is None and eager

    async def load(self, name: str, folders: list[ModelFolder], eager: bool = True) -> None:
        """Load the versions `folders` of model `name` that need it, then retire its versions not
        among them once one of them serves. One load of a model at a time: a caller that finds one
        under way waits for it, and then finds its versions loaded."""
        async with self._lock(name):
            wanted = [f for f in folders if self.needs_load(f, eager)]
            if wanted:
                await self._make_room(name)
            states = self.versions.setdefault(name, {})
            for folder in wanted:
                current = states.get(folder.version) or ModelState(folder)
                if current.served is None:
                    states[folder.version] = dataclasses.replace(current, status="loading")
                state = await asyncio.to_thread(self._loaded, current, folder)
                states[folder.version] = state
                if current.served is not None and state.served is not current.served:
                    log.info("model %s version %s swapped to its new files", name, folder.version)
                    self._retire(current.served)
            keep = {f.version for f in folders}
            if any(states[v].served for v in keep if v in states):
                for version in [v for v in states if v not in keep]:
                    self._drop(name, version, "no longer chosen by VERSION_POLICY or gone from the "
                                              "repository")

    async def unload(self, name: str, reason: str, forget: bool = False) -> None:
        """Stop serving every version of `name`; the index keeps them (unless `forget`) as
        unavailable with `reason`. Requests already admitted finish first."""
        async with self._lock(name):
            for version in list(self.versions.get(name, {})):
                if forget:
                    self._drop(name, version, reason)
                else:
                    self._unload(name, version, reason, on_demand=False)
            if forget:
                self.versions.pop(name, None)

    def _unload(self, name: str, version: str, reason: str, on_demand: bool) -> None:
        state = self.versions[name][version]
        if state.served is not None:
            self._retire(state.served)
            self._on_unload(name, version, reason)
            log.info("model %s version %s unloaded: %s", name, version, reason)
        self.versions[name][version] = ModelState(state.folder, "unavailable", reason,
                                                  fingerprint=state.fingerprint, on_demand=on_demand)

    def _drop(self, name: str, version: str, reason: str) -> None:
        self._unload(name, version, reason, on_demand=False)
        del self.versions[name][version]
        self._on_forget(name, version)

    async def _make_room(self, name: str) -> None:
        """Below MAX_LOADED_MODELS, unload the least recently used model no request holds; while
        every loaded model is in use, wait for one to fall idle."""
        bound = self.settings.max_loaded_models
        while bound:
            loaded = [n for n, states in self.versions.items()
                      if n != name and any(s.served for s in states.values())]
            if len(loaded) < bound:
                return
            idle = [n for n in loaded if not self._locked(n) and not any(
                id(s.served) in self._in_use for s in self.versions[n].values() if s.served)]
            if idle:
                victim = min(idle, key=lambda n: self._last_used.get(n, 0.0))
                for version in self.versions[victim]:
                    self._unload(victim, version, "unloaded to stay within MAX_LOADED_MODELS: "
                                                  "loads on its next request", on_demand=True)
                continue
            await asyncio.sleep(EVICTION_WAIT_SECONDS)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _locked(self, name: str) -> bool:
        return name in self._locks and self._locks[name].locked()

    def _retire(self, served: ServedModel) -> None:
        key = id(served)
        if key in self._in_use:
            self._retired.add(key)  # the last request holding it releases it
        else:
            self._release(key)

    def _release(self, key: int) -> None:
        self._retired.discard(key)
        batcher = self._batchers.pop(key, None)
        if batcher is not None:
            batcher.cancel()
        if self._trim is not None:  # hand the freed sessions' memory back to the OS
            self._trim()

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
        batcher = self._batchers.get(id(model))
        if batcher is None:
            batcher = self._batchers[id(model)] = Batcher(
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

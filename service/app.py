"""Wiring: settings, metrics, engine, lifecycle, routers and middleware into one FastAPI app.

`create_app` is an ASGI factory (`uvicorn --factory service.app:create_app`); `python -m service`
calls it once. MODEL_REPOSITORY names the repository.
"""
import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from contract import discover
from service import page, preprocess, status
from service.admission import Admission
from service.budget import MemoryBudget, default_budget_bytes
from service.dataplane import DataPlane
from service.engine import Engine
from service.error_responses import install_error_handlers
from service.lifecycle import Lifecycle
from service.log_writer import write_through_queue
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestRecorder, ShutdownAnswer
from service.model_control import by_model
from service.protocols import compare, open_inference, predict
from service.protocols.open_inference import extensions
from service.settings import Settings
from service.tracing import Tracing

log = logging.getLogger("service")


def create_app(settings: Settings | None = None, tracing: Tracing | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings.log_level)
    metrics = Metrics(settings.stats_window)
    tracing = tracing or Tracing.from_environment(metrics.registry)  # OTEL_* variables
    # No trailing-slash redirect: Starlette builds its Location from the Host header, which a
    # client sets; /predict/x/ is a 404 like any other unknown path. /docs is served from the
    # service's own copy of Swagger UI (service/page.py); no ReDoc.
    app = FastAPI(title="cnn-serve", version="0.1.0", lifespan=_lifespan, redirect_slashes=False,
                  docs_url=None, redoc_url=None,
                  description="Image classification with lightweight CNNs on onnxruntime. "
                              "Models with random weights give meaningless predictions.")
    admission = Admission(settings.max_in_flight_per_model, settings.retry_after_seconds,
                          settings.request_timeout_seconds, metrics.registry)
    budget = MemoryBudget(settings.memory_budget_bytes or default_budget_bytes(),
                          settings.retry_after_seconds, metrics.registry)
    # The repository is read when the app starts (the lifespan), so an app can be made without one.
    engine = Engine([], settings, on_batch=metrics.observe_batch, trim=budget.trim.soon,
                    on_load=metrics.observe_load, on_unload=metrics.observe_unload,
                    on_forget=metrics.forget_version)
    plane = DataPlane(settings, metrics, admission, budget, engine, Lifecycle(engine, admission, settings),
                      tracing=tracing)
    app.state.data_plane = plane  # reached through service.dataplane.data_plane(request)
    install_error_handlers(app)
    # The extensions first: /v2/models/stats is not the metadata of a model named "stats".
    for router in (predict.router, compare.router, extensions.router, open_inference.router,
                   open_inference.inference_router, open_inference.repository_router,
                   status.router, page.router):
        app.include_router(router)
    app.mount("/static", page.static_files, name="static")
    # Added innermost first: the request record sees every answer, the body limit only the app's reads.
    app.add_middleware(ShutdownAnswer)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, budget=budget)
    app.add_middleware(RequestRecorder, metrics=metrics, model_names=lambda: engine.versions, tracing=tracing)
    if settings.cors_origin_list:  # outermost, so a browser's preflight needs no API key
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST", "PUT"],
                           allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type",
                                          "Inference-Header-Content-Length"],
                           expose_headers=["X-Request-ID", "Server-Timing", "Retry-After",
                                           "Inference-Header-Content-Length"])
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    plane: DataPlane = app.state.data_plane
    settings = plane.settings
    engine = plane.engine
    metrics = plane.metrics
    budget = plane.budget
    chosen = by_model(discover(settings.model_repository), settings.version_policy)  # RepositoryNotFound
    engine.register([folder for versions in chosen.values() for folder in versions])
    started = time.perf_counter()
    # Every model is in /metrics from the start: as "loading", and with the series alerts divide by.
    metrics.expect_models(engine.models)
    _publish_models(engine, metrics)
    # Load in the background so /health/live answers (and /health/ready says 503) meanwhile.
    loading = asyncio.create_task(asyncio.to_thread(_load, engine, plane.control.startup_models()))
    loading.add_done_callback(lambda _: _loaded(engine, metrics, started))
    loading.add_done_callback(lambda _: budget.trim.started_up())
    if settings.memory_budget_bytes is None:  # less what the loaded models hold
        loading.add_done_callback(lambda _: budget.resize(default_budget_bytes()))
    polling = asyncio.create_task(_poll_after(loading, plane)) \
        if plane.settings.model_control_mode == "poll" else None
    yield
    plane.drain()  # also when run by plain uvicorn, which has no drain phase
    if polling is not None:
        polling.cancel()
    await loading
    engine.close()
    plane.lifecycle.close()
    budget.trim.cancel()


def _load(engine: Engine, names: set[str] | None) -> None:
    preprocess.warm_up()
    engine.load_all(names)


async def _poll_after(loading: asyncio.Task, plane: DataPlane) -> None:
    """Poll mode: scan the repository once the start-up load is done."""
    await asyncio.shield(loading)
    await plane.control.poll()


def _publish_models(engine: Engine, metrics: Metrics) -> None:
    for state in engine.models.values():
        meta = state.folder.metadata
        served = state.served
        metrics.observe_model(state.name, {
            "status": state.status, "architecture": meta.architecture if meta else "",
            "weights": meta.weights.kind if meta else "",
            "execution_provider": served.execution_provider if served else ""},
            served.load_ms if served else None, served.warmup_ms if served else None)


def _loaded(engine: Engine, metrics: Metrics, started: float) -> None:
    _publish_models(engine, metrics)
    ready = sum(m.status == "ready" for m in engine.models.values())
    log.info("%d of %d models ready %.2f s after start-up began", ready, len(engine.models),
             time.perf_counter() - started)


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("service")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        write_through_queue(logger, handler)  # never written from the event loop
        logger.propagate = False

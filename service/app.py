"""HTTP routes: parse the request, call preprocess / engine / metrics, shape the response.

`app = create_app()` is importable as `service.app:app`; MODEL_REPOSITORY names the repository.
"""
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import UploadFile

from service import preprocess
from service.admission import Admission
from service.engine import Engine, LoadedModel
from service.errors import (MissingFileField, TooManyFiles, TopKOutOfRange, UnsupportedMediaType,
                            install_error_handlers, json_error)
from service.metrics import Metrics, server_timing
from service.middleware import RequestObserver
from service.open_inference import router as open_inference_router
from service.model_repository import discover
from service.postprocess import top_k as best_classes
from service.schemas import (RANDOM_WEIGHTS_NOTE, ErrorBody, ImageInfo, Liveness, MetricsSummary,
                             ModelInfo, ModelList, Prediction, PredictResponse, Readiness, Timings,
                             WeightsInfo)
from service.settings import Settings

log = logging.getLogger("service")

RAW_IMAGE_TYPES = ("", "application/octet-stream")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503, 504)}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings.log_level)
    metrics = Metrics(settings.stats_window)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = Engine(discover(settings.model_repository), settings, on_batch=metrics.observe_batch)
        app.state.engine = engine
        app.state.preprocess_pool = ThreadPoolExecutor(settings.preprocess_workers,
                                                       thread_name_prefix="preprocess")
        started = time.perf_counter()
        # Load in the background so /health/live answers (and /health/ready says 503) meanwhile.
        loading = asyncio.create_task(asyncio.to_thread(_load, engine))
        loading.add_done_callback(lambda _: _publish_models(engine, metrics, started))
        yield
        app.state.draining = True  # also when run by plain uvicorn, which has no drain phase
        await loading
        engine.close()
        app.state.preprocess_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cnn-serve", version="0.1.0", lifespan=lifespan,
                  description="Image classification with lightweight CNNs on onnxruntime. "
                              "Models with random weights give meaningless predictions.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.admission = Admission(settings.max_in_flight_per_model, settings.retry_after_seconds,
                                    settings.request_timeout_seconds, metrics.registry)
    app.state.draining = False  # set on SIGTERM: readiness says 503 while requests finish
    install_error_handlers(app)
    app.include_router(open_inference_router)
    app.add_middleware(RequestObserver, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       model_names=lambda: app.state.engine.models if hasattr(app.state, "engine") else (),
                       api_key=settings.api_key.get_secret_value() if settings.api_key else None)
    if settings.cors_origin_list:  # outermost, so a browser's preflight needs no API key
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST", "PUT"],
                           allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type",
                                          "Inference-Header-Content-Length"],
                           expose_headers=["X-Request-ID", "Server-Timing", "Retry-After",
                                           "Inference-Header-Content-Length"])

    async def predict(model: str, request: Request,
                      top_k: int | None = Query(None, description="How many classes to return "
                                                "(1 .. the model's class count); default TOP_K.")
                      ) -> Response:
        started = time.perf_counter()
        engine: Engine = request.app.state.engine
        served = engine.model(model)
        meta = served.folder.metadata
        k = _checked_top_k(top_k, settings.top_k, meta.labels.count)
        async with request.app.state.admission.admit(model):
            data = await _image_bytes(request)
            decoded, tensor, decode_ms, preprocess_ms = await asyncio.get_running_loop().run_in_executor(
                request.app.state.preprocess_pool, preprocess.prepare, data, meta.preprocessing,
                settings.max_image_pixels)
            inference = await engine.infer(model, tensor)
        predictions = [Prediction(label=served.folder.labels[i], class_id=i, probability=p)
                       for i, p in best_classes(inference.outputs[0], meta.output.kind, k)]
        timings = Timings(decode=decode_ms, preprocess=preprocess_ms, queue=inference.queue_ms,
                          inference=inference.inference_ms,
                          total=(time.perf_counter() - started) * 1000)
        request.state.timings = timings.model_dump()
        body = PredictResponse(model=model, weights=_weights(served), predictions=predictions,
                               image=ImageInfo(width=decoded.width, height=decoded.height,
                                               format=decoded.format),
                               timings_ms=timings)
        # Serialised here, once, by pydantic's own encoder; response_model still documents it.
        return Response(body.model_dump_json(), media_type="application/json",
                        headers={"Server-Timing": server_timing(request.state.timings)})

    for method in ("POST", "PUT"):
        app.add_api_route("/predict/{model}", predict, methods=[method], response_model=PredictResponse,
                          name=f"predict_{method.lower()}", openapi_extra=UPLOAD_BODY,
                          responses=ERRORS, tags=["predict"],
                          summary=f"Classify an image ({'multipart field file, or raw body' if method == 'POST' else 'raw body, as curl -T sends it'})")

    @app.get("/models", response_model=ModelList, tags=["models"])
    async def list_models(request: Request) -> ModelList:
        engine: Engine = request.app.state.engine
        return ModelList(models=[_model_info(m, engine) for m in engine.models.values()])

    @app.get("/models/{model}", response_model=ModelInfo, responses={404: {"model": ErrorBody}},
             tags=["models"])
    async def get_model(model: str, request: Request) -> ModelInfo:
        engine: Engine = request.app.state.engine
        if model not in engine.models:
            engine.model(model)  # raises UnknownModel with the valid names
        return _model_info(engine.models[model], engine)

    @app.get("/metrics", tags=["metrics"], responses={200: {"content": {
        "text/plain": {}, "application/json": {"schema": MetricsSummary.model_json_schema()}}}})
    async def get_metrics(request: Request, format: str | None = Query(
            None, pattern="^(prometheus|json|table)$",
            description="prometheus (default), json (also via Accept: application/json) or table")
            ) -> Response:
        wanted = format or ("json" if "application/json" in request.headers.get("accept", "")
                            else "prometheus")
        if wanted == "json":
            return Response(orjson.dumps(metrics.summary()), media_type="application/json")
        if wanted == "table":
            return Response(metrics.table(), media_type="text/plain; charset=utf-8")
        return Response(metrics.prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health/live", response_model=Liveness, tags=["health"])
    async def live() -> Liveness:
        return Liveness()

    @app.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}},
             tags=["health"])
    async def ready(request: Request) -> Response:
        engine: Engine = request.app.state.engine
        statuses = {name: m.status for name, m in engine.models.items()}
        failed = {name: m.error or "" for name, m in engine.models.items() if m.status == "failed"}
        is_ready = engine.is_ready(settings.strict_readiness) and not request.app.state.draining
        body = Readiness(ready=is_ready, loading_done=engine.loading_done, models=statuses,
                         failed=failed)
        return json_error(200 if is_ready else 503, body.model_dump())

    return app


def _load(engine: Engine) -> None:
    preprocess.warm_up()
    engine.load_all()


async def _image_bytes(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        async with request.form() as form:
            uploads = [u for u in form.getlist("file") if isinstance(u, UploadFile)]
            if not uploads:
                raise MissingFileField(list(form.keys()))
            if len(uploads) > 1:
                raise TooManyFiles(len(uploads))
            return await uploads[0].read()
    if media_type in RAW_IMAGE_TYPES or media_type.startswith("image/"):
        return await request.body()
    raise UnsupportedMediaType(content_type)


def _checked_top_k(requested: int | None, default: int, classes: int) -> int:
    if requested is None:
        return min(default, classes)
    if not 1 <= requested <= classes:
        raise TopKOutOfRange(requested, classes)
    return requested


def _weights(model: LoadedModel) -> WeightsInfo:
    weights = model.folder.metadata.weights
    note = weights.note or (RANDOM_WEIGHTS_NOTE if weights.kind == "random" else None)
    return WeightsInfo(kind=weights.kind, source=weights.source, note=note)


def _model_info(model: LoadedModel, engine: Engine) -> ModelInfo:
    meta = model.folder.metadata
    return ModelInfo(name=model.name, status=model.status, error=model.error,
                     execution_provider=model.execution_provider, onnx_file=model.onnx_file,
                     intra_op_threads=model.threads or engine.settings.intra_op_threads,
                     inference_workers=engine.workers, load_ms=model.load_ms,
                     warmup_ms=model.warmup_ms,
                     weights_note=_weights(model).note if meta else None, metadata=meta)


def _publish_models(engine: Engine, metrics: Metrics, started: float) -> None:
    for model in engine.models.values():
        meta = model.folder.metadata
        metrics.observe_model(model.name, {
            "status": model.status, "architecture": meta.architecture if meta else "",
            "weights": meta.weights.kind if meta else "",
            "execution_provider": model.execution_provider or ""}, model.load_ms, model.warmup_ms)
    ready = sum(m.status == "ready" for m in engine.models.values())
    log.info("%d of %d models ready %.2f s after start-up began", ready, len(engine.models),
             time.perf_counter() - started)


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("service")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


app = create_app()

"""What the service tells about itself: models, health and the latency comparison (`/metrics`)."""
from typing import Literal

import orjson
from fastapi import APIRouter, Query, Request, Response
from prometheus_client.openmetrics import exposition as openmetrics
from pydantic import BaseModel, Field

from contract import ModelMetadata, ModelStatus
from service.dataplane import data_plane
from service.engine import Engine, ModelState
from service.error_responses import ErrorBody, json_response


class ModelInfo(BaseModel):
    name: str
    status: ModelStatus
    error: str | None = None
    execution_provider: str | None = None
    onnx_file: str | None = Field(None, description="The file the session was created from.")
    intra_op_threads: int = Field(description="onnxruntime threads a lone request runs on.")
    inference_workers: int
    load_ms: float | None = Field(None, description="Hash check + session creation.")
    warmup_ms: float | None = Field(None, description="Warm-up runs and the choice of threads.")
    weights_note: str | None = None
    weights_source: str | None = Field(None, description="Where the weights came from: seed, URL or file.")
    preprocessing: str | None = Field(None, description="The preprocessing the weights were trained with, "
                                                        "in one line; `metadata.preprocessing` has it exactly.")
    metadata: ModelMetadata | None = Field(None, description="metadata.json as it stands.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    ready: bool
    loading_done: bool
    models: dict[str, ModelStatus]
    failed: dict[str, str] = Field(description="Model name to the reason it failed to load.")


class StageStats(BaseModel):
    count: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float


class ModelStats(BaseModel):
    requests: int
    errors: int
    statuses: dict[str, int] = Field(description="Answers by HTTP status, e.g. 503 for shed load.")
    throughput_rps: float | None = Field(
        description="Successful predictions per second between the first and the last of them.")
    batch_sizes: dict[str, int] = Field(description="session.run calls by realised batch size.")
    stages_ms: dict[str, StageStats]


class MetricsSummary(BaseModel):
    window: int = Field(description="Most recent requests per model used for the percentiles.")
    process_rss_bytes: int | None = None
    models: dict[str, ModelStats]


router = APIRouter()


@router.get("/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> ModelList:
    engine = data_plane(request).engine
    return ModelList(models=[model_info(m, engine) for m in engine.models.values()])


@router.get("/models/{model}", response_model=ModelInfo, responses={404: {"model": ErrorBody}},
            tags=["models"])
async def get_model(model: str, request: Request) -> ModelInfo:
    engine = data_plane(request).engine
    if model not in engine.models:
        engine.model(model)  # raises UnknownModel with the valid names
    return model_info(engine.models[model], engine)


@router.get("/metrics", tags=["metrics"], responses={200: {"content": {
    "text/plain": {}, "application/openmetrics-text": {},
    "application/json": {"schema": MetricsSummary.model_json_schema()}}}})
async def get_metrics(request: Request, format: str | None = Query(
        None, pattern="^(prometheus|json|table)$",
        description="prometheus (default; OpenMetrics, with exemplars, via Accept: "
                    "application/openmetrics-text), json (also via Accept: application/json) or table")
        ) -> Response:
    metrics = data_plane(request).metrics
    wanted = format or ("json" if "application/json" in request.headers.get("accept", "")
                        else "prometheus")
    if wanted == "json":
        return Response(orjson.dumps(metrics.summary()), media_type="application/json")
    if wanted == "table":
        return Response(metrics.table(), media_type="text/plain; charset=utf-8")
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(metrics.openmetrics_text(), media_type=openmetrics.CONTENT_TYPE_LATEST)
    return Response(metrics.prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/health/live", response_model=Liveness, tags=["health"])
@router.head("/health/live", include_in_schema=False)
async def live() -> Liveness:
    return Liveness()


@router.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}},
            tags=["health"])
@router.head("/health/ready", include_in_schema=False)
async def ready(request: Request) -> Response:
    engine = data_plane(request).engine
    body = Readiness(ready=data_plane(request).ready(), loading_done=engine.loading_done,
                     models={name: m.status for name, m in engine.models.items()},
                     failed={name: m.error or "" for name, m in engine.models.items()
                             if m.status == "failed"})
    return json_response(200 if body.ready else 503, body.model_dump())


def model_info(state: ModelState, engine: Engine) -> ModelInfo:
    served = state.served
    meta = state.folder.metadata
    return ModelInfo(name=state.name, status=state.status, error=state.error,
                     execution_provider=served.execution_provider if served else None,
                     onnx_file=served.onnx_file if served else None,
                     intra_op_threads=served.threads if served else engine.settings.intra_op_threads,
                     inference_workers=engine.workers,
                     load_ms=served.load_ms if served else None,
                     warmup_ms=served.warmup_ms if served else None,
                     weights_note=meta.weights.shown_note if meta else None,
                     weights_source=meta.weights.source if meta else None,
                     preprocessing=meta.preprocessing.describe() if meta else None, metadata=meta)

"""Pydantic models of every HTTP response body, so /docs shows the real contract."""
from typing import Literal

from pydantic import BaseModel, Field

from service.model_repository import ModelMetadata

RANDOM_WEIGHTS_NOTE = "Random weights: predictions are meaningless."


class Prediction(BaseModel):
    label: str
    class_id: int
    probability: float


class WeightsInfo(BaseModel):
    kind: Literal["random", "imagenet", "custom"]
    source: str | None = None
    note: str | None = Field(None, description="Says plainly when predictions are meaningless.")


class ImageInfo(BaseModel):
    width: int = Field(description="Width of the upright image as uploaded (after EXIF rotation).")
    height: int
    format: str = Field(description="Format Pillow detected, e.g. JPEG, PNG.")


class Timings(BaseModel):
    """Milliseconds per stage of this request; `total` runs from the route's start to its end."""

    decode: float
    preprocess: float
    queue: float = Field(description="Wait for a free inference worker.")
    inference: float
    total: float


class PredictResponse(BaseModel):
    model: str
    weights: WeightsInfo
    predictions: list[Prediction]
    image: ImageInfo
    timings_ms: Timings


class ModelInfo(BaseModel):
    name: str
    status: Literal["loading", "ready", "failed"]
    error: str | None = None
    execution_provider: str | None = None
    onnx_file: str | None = Field(None, description="The file the session was created from.")
    intra_op_threads: int
    inference_workers: int
    load_ms: float | None = Field(None, description="Hash check + session creation.")
    warmup_ms: float | None = None
    weights_note: str | None = None
    metadata: ModelMetadata | None = Field(None, description="metadata.json as it stands.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    ready: bool
    loading_done: bool
    models: dict[str, Literal["loading", "ready", "failed"]]
    failed: dict[str, str] = Field(description="Model name to the reason it failed to load.")


class StageStats(BaseModel):
    count: int
    mean: float
    p50: float
    p90: float
    p99: float


class ModelStats(BaseModel):
    requests: int
    errors: int
    throughput_rps: float | None = Field(
        description="Successful predictions per second between the first and the last of them.")
    stages_ms: dict[str, StageStats]


class MetricsSummary(BaseModel):
    window: int = Field(description="Most recent requests per model used for the percentiles.")
    process_rss_bytes: int | None = None
    models: dict[str, ModelStats]


class ErrorBody(BaseModel):
    error: str

"""`POST /compare`: one image in (as `/predict` takes it), every model's answer out, side by side.

Each model's entry is what its own `/predict` answers for the photo, or the error it would answer
with; beside them, the shared stages' timings and how far the models agree. The work is
`service/compare.py`'s.
"""
from itertools import combinations
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service import compare as comparing
from service.auth import INFERENCE_DEPENDENCIES
from service.dataplane import data_plane
from service.error_responses import ErrorBody, error_body
from service.metrics import COMPARISON, server_timing
from service.protocols.upload import UPLOAD_BODY, ImageInfo, PredictAdapter, PredictResponse
from service.record import record_of

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503, 504)}


class ModelError(ErrorBody):
    """A model that could not answer: the error its own /predict would have answered with."""

    model_config = ConfigDict(extra="allow")  # the error's own fields, e.g. retry_after_seconds
    http_status: int = Field(description="The HTTP status /predict would have answered with.")


class SharedTimings(BaseModel):
    """Milliseconds of the stages done once for every model."""

    read: float = Field(description="Receiving the upload.")
    decode: float = Field(description="Every decode made: one, or one more per JPEG draft size.")
    preprocess: float = Field(description="Every tensor made: one per distinct preprocessing.")
    total: float


class Agreement(BaseModel):
    """How far the models that answered agree, comparing classes by label (models trained on
    different datasets agree only where their labels are the same words)."""

    top1_label: str | None = Field(description="The label most models put first.")
    top1_models: list[str] = Field(description="The models that put it first.")
    top1_agreement: float | None = Field(description="Their share of the models that answered.")
    top_k_overlap: float | None = Field(
        description="Mean over pairs of answering models of the labels their top-k share, divided by "
                    "the shorter top-k; 1: identical sets. None with fewer than two answers.")


class CompareResponse(BaseModel):
    models: list[str] = Field(description="The models compared, in the order named.")
    results: dict[str, PredictResponse | ModelError] = Field(
        description="Per model, its /predict answer for the photo, or its error (with a `code`).")
    image: ImageInfo
    timings_ms: SharedTimings
    agreement: Agreement


def agreement(answers: dict[str, PredictResponse]) -> Agreement:
    firsts = {name: answer.predictions[0].label for name, answer in answers.items()}
    if not firsts:
        return Agreement(top1_label=None, top1_models=[], top1_agreement=None, top_k_overlap=None)
    labels = list(firsts.values())
    top1 = max(labels, key=labels.count)  # ties: the first model's
    sets = [{p.label for p in answer.predictions} for answer in answers.values()]
    overlaps = [len(a & b) / min(len(a), len(b)) for a, b in combinations(sets, 2)]
    return Agreement(top1_label=top1, top1_models=[n for n, label in firsts.items() if label == top1],
                     top1_agreement=labels.count(top1) / len(labels),
                     top_k_overlap=sum(overlaps) / len(overlaps) if overlaps else None)


def compared(comparison: comparing.Comparison, adapter: PredictAdapter) -> CompareResponse:
    results: dict[str, PredictResponse | ModelError] = {}
    answers: dict[str, PredictResponse] = {}
    for entry in comparison.entries:
        if entry.result is not None:
            results[entry.name] = answers[entry.name] = adapter.answer(entry.result)
        elif entry.error is not None:
            status, body = error_body(entry.error)
            results[entry.name] = ModelError(http_status=status, **body)
    image = comparison.image
    return CompareResponse(models=[e.name for e in comparison.entries], results=results,
                           image=ImageInfo(width=image.width, height=image.height, format=image.format),
                           timings_ms=SharedTimings(**comparison.timings), agreement=agreement(answers))


router = APIRouter(tags=["compare"], dependencies=INFERENCE_DEPENDENCIES)


async def compare(request: Request,
                  models: str | None = Query(None, description="Comma-separated model names; default: "
                                             "every ready model. At most MAX_COMPARE_MODELS."),
                  top_k: int | None = Query(None, description="How many classes each model returns "
                                            "(1 .. its class count); default TOP_K."),
                  input_image: bool = Query(False, description="Also return, per model, the image as "
                                            "it saw it (resized and cropped), as a PNG data URL."),
                  sequential: bool = Query(False, description="Run the models one after another, so "
                                           "that their latencies do not interfere; default: at once.")
                  ) -> Response:
    plane = data_plane(request)
    record = record_of(request)
    record.model = COMPARISON  # the shared stages count once, in this series; each model in its own
    names = comparing.chosen_models(plane.engine, [n.strip() for n in models.split(",") if n.strip()]
                                    if models else None, plane.settings.max_compare_models)
    adapter = PredictAdapter(top_k, plane.settings.top_k, input_image)
    comparison = await comparing.compare(plane, request, names, adapter, sequential)
    shared = comparison.timings
    record.timings = {stage: shared[stage] for stage in ("read", "decode", "preprocess", "total")}
    exclude = None if input_image else {"results": {"__all__": {"input_image"}}}
    body = compared(comparison, adapter).model_dump_json(exclude=exclude)
    record.memory.reserve(len(body))  # held until it is sent: MemoryExhausted 503
    return Response(body, media_type="application/json", headers={"Server-Timing": server_timing(shared)})


for method, upload in (("POST", "multipart field file, or raw body"), ("PUT", "raw body, as curl -T sends it")):
    router.add_api_route("/compare", compare, methods=[method], response_model=CompareResponse,
                         name=f"compare_{method.lower()}", openapi_extra=UPLOAD_BODY, responses=ERRORS,
                         summary=f"Classify an image with every model, side by side ({upload})")

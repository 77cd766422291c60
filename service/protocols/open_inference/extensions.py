"""Triton's statistics and model-configuration extensions over REST, in Triton's JSON shapes
(service/protocols/open_inference/triton_extensions.py), for tools that read them (perf_analyzer
asks `GET /v2/models/stats` and the model's config)."""
from typing import Any

from fastapi import APIRouter, Request

from service.dataplane import data_plane
from service.error_responses import ErrorBody
from service.protocols.open_inference.triton_extensions import model_config, model_statistics

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (404, 503)}

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


@router.get("/models/stats", responses=ERRORS, summary="Statistics of every model (Triton's extension)")
async def all_statistics(request: Request) -> dict:
    return model_statistics(data_plane(request), None, None)


@router.get("/models/{model}/stats", responses=ERRORS)
@router.get("/models/{model}/versions/{version}/stats", responses=ERRORS)
async def statistics(model: str, request: Request, version: str | None = None) -> dict:
    if version is not None:
        data_plane(request).engine.model(model, version)  # 404 for a version there is not
    return model_statistics(data_plane(request), model, version)


@router.get("/models/{model}/config", responses=ERRORS)
@router.get("/models/{model}/versions/{version}/config", responses=ERRORS)
async def config(model: str, request: Request, version: str | None = None) -> dict:
    plane = data_plane(request)
    served = plane.engine.model(model, version)  # 404 unknown, 503 loading or failed
    return model_config(served, plane.settings.max_images_per_request)

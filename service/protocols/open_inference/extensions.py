"""Triton's statistics and model-configuration extensions over REST, in Triton's JSON shapes
(service/protocols/open_inference/triton_extensions.py), for tools that read them (perf_analyzer
asks `GET /v2/models/stats` and the model's config)."""
from fastapi import APIRouter, Request

from service.dataplane import data_plane
from service.error_responses import ErrorBody
from service.errors import UnknownModelVersion
from service.protocols.open_inference.triton_extensions import model_config, model_statistics

VERSION = "1"  # as service/protocols/open_inference/routes.py: one version per repository folder
ERRORS = {code: {"model": ErrorBody} for code in (404, 503)}

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


@router.get("/models/stats", responses=ERRORS, summary="Statistics of every model (Triton's extension)")
async def all_statistics(request: Request) -> dict:
    return model_statistics(data_plane(request), None, VERSION)


@router.get("/models/{model}/stats", responses=ERRORS)
@router.get("/models/{model}/versions/{version}/stats", responses=ERRORS)
async def statistics(model: str, request: Request, version: str | None = None) -> dict:
    _check_version(model, version)
    return model_statistics(data_plane(request), model, VERSION)


@router.get("/models/{model}/config", responses=ERRORS)
@router.get("/models/{model}/versions/{version}/config", responses=ERRORS)
async def config(model: str, request: Request, version: str | None = None) -> dict:
    plane = data_plane(request)
    served = plane.engine.model(model)  # 404 unknown, 503 loading or failed
    _check_version(model, version)
    return model_config(served, plane.settings.max_images_per_request)


def _check_version(model: str, version: str | None) -> None:
    if version is not None and version != VERSION:
        raise UnknownModelVersion(model, version, [VERSION])

"""Triton's model repository extension: the index, and loading and unloading models by name.

`POST /v2/repository/index` answers in every model control mode; load and unload are refused with
`model_control_disabled` while MODEL_CONTROL_MODE is none. A load returns once the model's newest
chosen version serves, or with the reason it could not (`model_load_failed`, naming the check);
loading a loaded model reloads it from the repository (new versions, changed files). All three
need the API key, as inference does; they are not counted as predictions of the model they name.
Request bodies (Triton's `parameters`) are accepted and ignored.
"""
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from service.auth import requires_api_key
from service.dataplane import data_plane
from service.error_responses import ErrorBody


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING or UNAVAILABLE, as Triton says them.")
    reason: str = Field(description="Why the version is not ready (the check that failed, "
                                    "unloaded, waiting for its files); empty when ready.")


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 404, 409)}
router = APIRouter(prefix="/v2/repository", tags=["model repository"],
                   dependencies=[Depends(requires_api_key)])


@router.post("/index", response_model=list[RepositoryModel], responses=ERRORS)
async def repository_index(request: Request) -> list[RepositoryModel]:
    return [RepositoryModel(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in data_plane(request).control.index()]


@router.post("/models/{model}/load", responses=ERRORS, status_code=200)
async def load_model(model: str, request: Request) -> Response:
    await data_plane(request).control.load(model)
    return Response(status_code=200)


@router.post("/models/{model}/unload", responses=ERRORS, status_code=200)
async def unload_model(model: str, request: Request) -> Response:
    await data_plane(request).control.unload(model)
    return Response(status_code=200)

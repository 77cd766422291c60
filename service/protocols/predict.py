"""`POST /predict/{model}`: one image in (multipart field `file`, or the raw body), top-k classes out."""
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from service.auth import INFERENCE_DEPENDENCIES
from service.dataplane import data_plane
from service.error_responses import ErrorBody
from service.protocols.upload import UPLOAD_BODY, PredictAdapter, PredictResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503, 504)}


router = APIRouter(tags=["predict"], dependencies=INFERENCE_DEPENDENCIES)


async def predict(model: str, request: Request,
                  top_k: int | None = Query(None, description="How many classes to return "
                                            "(1 .. the model's class count); default TOP_K."),
                  input_image: bool = Query(False, description="Also return the image as the model "
                                            "saw it (resized and cropped), as a PNG data URL."),
                  version: str | None = Query(None, description="The model version to use; default: "
                                              "the newest ready one.")
                  ) -> Response:
    plane = data_plane(request)
    adapter = PredictAdapter(top_k, plane.settings.top_k, input_image)
    return await plane.lifecycle.handle(request, model, adapter, version)


for method, upload in (("POST", "multipart field file, or raw body"), ("PUT", "raw body, as curl -T sends it")):
    router.add_api_route("/predict/{model}", predict, methods=[method], response_model=PredictResponse,
                         name=f"predict_{method.lower()}", openapi_extra=UPLOAD_BODY, responses=ERRORS,
                         summary=f"Classify an image ({upload})")

"""The dependencies of the inference routers: a route added to one of them is counted per model and
guarded by the API key, and a refused request is answered before a byte of its body is read."""
import hmac

from fastapi import Depends, Request

from service.dataplane import data_plane
from service.errors import Unauthorized
from service.record import record_of


async def names_the_model(request: Request) -> None:
    """Record the model the path names, so the request counts as that model's prediction."""
    record_of(request).model = request.path_params.get("model")


async def requires_api_key(request: Request) -> None:
    """Refuse the request unless it carries the API key, when one is set."""
    expected = data_plane(request).settings.api_key
    if expected is None:
        return
    given = _given_key(request)
    if given is None:
        raise Unauthorized("missing API key")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("wrong API key")


def _given_key(request: Request) -> str | None:
    authorization = request.headers.get("authorization")
    if authorization is not None and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return request.headers.get("x-api-key")


INFERENCE_DEPENDENCIES = [Depends(names_the_model), Depends(requires_api_key)]

"""The dependencies of the inference routers: a route added to one of them is counted per model and
guarded by the API key, and a refused request is answered before a byte of its body is read."""
import hmac
from collections.abc import Mapping

from fastapi import Depends, Request
from pydantic import SecretStr

from service.dataplane import data_plane
from service.errors import Unauthorized
from service.record import record_of


async def names_the_model(request: Request) -> None:
    """Record the model the path names, so the request counts as that model's prediction."""
    record_of(request).model = request.path_params.get("model")


async def requires_api_key(request: Request) -> None:
    """Refuse the request unless it carries the API key, when one is set."""
    check_api_key(data_plane(request).settings.api_key, request.headers)


def check_api_key(expected: SecretStr | None, headers: Mapping[str, str]) -> None:
    """Unauthorized unless `headers` (HTTP headers, or gRPC metadata: lower-case names) carry the
    key, when one is set."""
    if expected is None:
        return
    given = _given_key(headers)
    if given is None:
        raise Unauthorized("missing API key")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("wrong API key")


def _given_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization")
    if authorization is not None and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return headers.get("x-api-key")


INFERENCE_DEPENDENCIES = [Depends(names_the_model), Depends(requires_api_key)]

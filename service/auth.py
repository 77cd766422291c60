"""The dependencies of the inference routers: a route added to one of them is guarded by the API key
and counted per model, and a refused request is answered before a byte of its body is read."""
import hmac

from fastapi import Depends, Request

from service.errors import Unauthorized


async def inference_request(request: Request) -> None:
    """Tell the metrics middleware that this request is a prediction of the model in its path, then
    refuse it unless it carries the API key (when one is set). One dependency, not two: each costs
    a resolution on every request."""
    request.state.prediction_for = request.path_params.get("model")
    expected = request.app.state.settings.api_key
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


INFERENCE_DEPENDENCIES = [Depends(inference_request)]

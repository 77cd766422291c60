"""Every error a client can cause, and the one table that turns each into an HTTP response.

The exception types know nothing of HTTP; they are raised near the cause (preprocess, engine,
lifecycle, protocol adapters) and `ERRORS` below is the only place that decides each one's status
code and its stable machine-readable `code`. Every error body is JSON: `error` (for people),
`code` (for programs) and fields that help fix the request.
"""
import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

log = logging.getLogger("service.errors")

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}  # for errors Starlette raises
ACCEPTED_FORMATS = ["JPEG", "PNG", "WebP", "GIF (first frame)", "BMP", "TIFF"]
ACCEPTED_UPLOADS = ["multipart/form-data with the image in field 'file'",
                    "a raw body with Content-Type image/* or application/octet-stream (POST)",
                    "a raw body with PUT (curl -T)"]


class ErrorBody(BaseModel):
    """Every error answer; some carry more fields that help fix the request."""

    error: str = Field(description="What went wrong, for people; may be reworded.")
    code: str = Field(description="Stable and machine-readable, e.g. unknown_model, too_many_images.")


class ServiceError(Exception):
    """A failure with a message for the client and extra JSON fields that help fix it."""

    headers: dict[str, str] = {}  # HTTP headers the answer must carry, e.g. Retry-After

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class UnknownModel(ServiceError):
    def __init__(self, model: str, models: list[str]) -> None:
        super().__init__(f"unknown model {model!r}; valid names: {', '.join(models) or '(none)'}",
                         models=models)


class ModelUnavailable(ServiceError):
    def __init__(self, model: str, status: str, reason: str | None) -> None:
        state = "failed to load" if status == "failed" else f"is {status}"
        super().__init__(f"model {model!r} {state}" + (f": {reason}" if reason else ""), status=status)


class EmptyBody(ServiceError):
    def __init__(self) -> None:
        super().__init__("empty body: send the image bytes", accepted_formats=ACCEPTED_FORMATS,
                         accepted_uploads=ACCEPTED_UPLOADS)


class UndecodableImage(ServiceError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"could not decode image: {reason}", accepted_formats=ACCEPTED_FORMATS)


class UnsupportedMediaType(ServiceError):
    def __init__(self, content_type: str) -> None:
        super().__init__(f"unsupported Content-Type {content_type!r}",
                         accepted_uploads=ACCEPTED_UPLOADS, accepted_formats=ACCEPTED_FORMATS)


class MissingFileField(ServiceError):
    def __init__(self, fields: list[str]) -> None:
        super().__init__("multipart body has no file in field 'file'"
                         + (f" (fields sent: {', '.join(fields)})" if fields else ""),
                         accepted_uploads=ACCEPTED_UPLOADS)


class TooManyFiles(ServiceError):
    def __init__(self, count: int) -> None:
        super().__init__(f"multipart body has {count} files in field 'file'; send exactly one",
                         accepted_uploads=ACCEPTED_UPLOADS)


class TopKOutOfRange(ServiceError):
    def __init__(self, top_k: int, classes: int) -> None:
        super().__init__(f"top_k must be between 1 and {classes} (the model's class count), got {top_k}",
                         max_top_k=classes)


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than the limit of {limit} bytes (MAX_BODY_BYTES)",
                         limit_bytes=limit)


class ImageTooLarge(ServiceError):
    def __init__(self, limit: int, width: int | None = None, height: int | None = None) -> None:
        size = f"{width}x{height} = {width * height} pixels" if width and height else "decompression bomb"
        super().__init__(f"image too large ({size}): the limit is {limit} pixels (MAX_IMAGE_PIXELS)",
                         limit_pixels=limit)


class Overloaded(ServiceError):
    def __init__(self, model: str, limit: int, retry_after: int) -> None:
        super().__init__(f"model {model!r} is at its limit of {limit} requests in flight "
                         f"(MAX_IN_FLIGHT_PER_MODEL); retry after {retry_after} s",
                         limit=limit, retry_after_seconds=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class RequestTimedOut(ServiceError):
    def __init__(self, model: str, timeout: float) -> None:
        super().__init__(f"request for model {model!r} took longer than {timeout:g} s "
                         "(REQUEST_TIMEOUT_SECONDS)", timeout_seconds=timeout)


class Unauthorized(ServiceError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}: send the API key as 'Authorization: Bearer <key>' or "
                         "'X-API-Key: <key>'")
        self.headers = {"WWW-Authenticate": "Bearer"}


class UnknownModelVersion(ServiceError):
    def __init__(self, model: str, version: str, versions: list[str]) -> None:
        super().__init__(f"model {model!r} has no version {version!r}; versions: {', '.join(versions)}",
                         versions=versions)


class InvalidInferenceRequest(ServiceError):
    """An Open Inference Protocol request the model cannot take: names, datatypes, shapes, sizes."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid inference request: {reason}")


class TooManyImages(ServiceError):
    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} images in one request; the limit is {limit} "
                         "(MAX_IMAGES_PER_REQUEST)", limit=limit)


class TooManyPixels(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the images of this request hold more than {limit} pixels in all "
                         "(MAX_REQUEST_PIXELS); send fewer or smaller images", limit_pixels=limit)


class BodyTimedOut(ServiceError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout:g} s (BODY_TIMEOUT_SECONDS)",
                         timeout_seconds=timeout)


class ClientClosedRequest(ServiceError):
    """The client went away before its answer; nobody reads this one, but it is counted and logged."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the request was answered")


class HeadersTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request line and headers larger than {limit} bytes (MAX_HEADER_BYTES)",
                         limit_bytes=limit)


class HeadersTimedOut(ServiceError):
    def __init__(self, timeout: float) -> None:
        super().__init__(f"request line and headers not received within {timeout:g} s of their "
                         "first byte (HEADERS_TIMEOUT_SECONDS)", timeout_seconds=timeout)


class TooManyConnections(ServiceError):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"the server holds its limit of {limit} connections (MAX_CONNECTIONS); "
                         f"retry after {retry_after} s", limit=limit, retry_after_seconds=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class JsonTooLarge(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the JSON body holds more than {limit} values (MAX_JSON_VALUES); send large "
                         "tensors as binary data (the binary_tensor_data extension)", limit=limit)


class InferenceFailed(ServiceError):
    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"inference failed for model {model!r}: {reason}")


class UnsupportedImageFormat(ServiceError):
    def __init__(self, image_format: str) -> None:
        super().__init__(f"unsupported image format {image_format}; accepted: "
                         f"{', '.join(ACCEPTED_FORMATS)}", format=image_format,
                         accepted_formats=ACCEPTED_FORMATS)


class ImageTooComplex(ServiceError):
    """An image small in bytes and pixels whose structure would make decoding cost far more."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"image too complex to decode: {reason}")


class MemoryExhausted(ServiceError):
    def __init__(self, budget: int, retry_after: int) -> None:
        super().__init__(f"the requests in flight hold the server's memory budget of {budget} bytes "
                         f"(MEMORY_BUDGET_BYTES); retry after {retry_after} s",
                         budget_bytes=budget, retry_after_seconds=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


# Each error's HTTP status and its stable, machine-readable `code`: clients branch on the code,
# people read the message, which may be reworded.
ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    UnknownModel: (404, "unknown_model"),
    UnknownModelVersion: (404, "unknown_model_version"),
    ModelUnavailable: (503, "model_unavailable"),
    EmptyBody: (400, "empty_body"),
    UndecodableImage: (400, "undecodable_image"),
    InvalidInferenceRequest: (400, "invalid_inference_request"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    MissingFileField: (422, "missing_file_field"),
    TooManyFiles: (422, "too_many_files"),
    TopKOutOfRange: (422, "top_k_out_of_range"),
    BodyTooLarge: (413, "body_too_large"),
    ImageTooLarge: (413, "image_too_large"),
    TooManyImages: (413, "too_many_images"),
    TooManyPixels: (413, "too_many_pixels"),
    JsonTooLarge: (413, "json_too_large"),
    BodyTimedOut: (408, "body_timeout"),
    ClientClosedRequest: (499, "client_closed_request"),  # nginx's status for it
    HeadersTooLarge: (431, "headers_too_large"),
    HeadersTimedOut: (408, "headers_timeout"),
    TooManyConnections: (503, "too_many_connections"),
    Unauthorized: (401, "unauthorized"),
    Overloaded: (503, "overloaded"),
    RequestTimedOut: (504, "timeout"),
    InferenceFailed: (500, "inference_failed"),
    UnsupportedImageFormat: (415, "unsupported_image_format"),
    ImageTooComplex: (422, "image_too_complex"),
    MemoryExhausted: (503, "memory_exhausted"),
}


def json_error(status_code: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, headers=headers,
                    media_type="application/json")


def error_body(exc: ServiceError) -> tuple[int, dict]:
    status, code = ERRORS[type(exc)]
    return status, {"error": exc.message, "code": code, **exc.details}


def error_response(exc: ServiceError) -> Response:
    status, body = error_body(exc)
    return json_error(status, body, headers=exc.headers or None)


async def _service_error(request: Request, exc: ServiceError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    body: dict = {"error": exc.detail if isinstance(exc.detail, str) else str(exc.detail)}
    if exc.status_code == 405:
        # Starlette names only the first route matching the path; POST and PUT are two routes, and
        # an included router hides its routes' methods, so ask every route about every method.
        allowed = [m for m in HTTP_METHODS
                   if any(r.matches({**request.scope, "method": m})[0] == Match.FULL
                          for r in request.app.routes)]
        headers = {"Allow": ", ".join(allowed)}
        return json_error(405, {"error": f"method {request.method} not allowed on {request.url.path}; "
                                         f"allowed: {', '.join(allowed)}", "code": "method_not_allowed"},
                          headers=headers)
    if exc.status_code == 404 and exc.detail == "Not Found":
        body = {"error": f"no route {request.url.path}; see /docs"}
    body["code"] = HTTP_CODES.get(exc.status_code, "http_error")
    return json_error(exc.status_code, body, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = [{"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
                for e in exc.errors()]
    message = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
    return json_error(422, {"error": f"invalid request: {message}", "code": "invalid_request",
                            "problems": problems})


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return json_error(500, {"error": f"internal error: {type(exc).__name__}", "code": "internal_error"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)

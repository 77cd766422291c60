"""Errors as answers: the one table of each error's HTTP status and stable `code`, the JSON body
every error gets, and the handlers FastAPI calls.

An error's status is found by its class hierarchy (the first class in `ERRORS` along its MRO, as
Starlette finds exception handlers), so a new `ServiceError` subclass answers with its parent's
status and code until it has its own, and never falls through to a bare 500. Every error body is
JSON: `error` (for people), `code` (for programs) and fields that help fix the request.
"""
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar, cast

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import HTTPExceptionHandler

from service.errors import (
    BadHttpRequest,
    BodyTimedOut,
    BodyTooLarge,
    ClientClosedRequest,
    EmptyBody,
    HeadersTimedOut,
    HeadersTooLarge,
    ImageTooComplex,
    ImageTooLarge,
    InferenceFailed,
    InvalidInferenceRequest,
    InvalidMultipart,
    JsonTooLarge,
    MemoryExhausted,
    MissingFileField,
    ModelControlDisabled,
    ModelLoadFailed,
    ModelUnavailable,
    Overloaded,
    RequestTimedOut,
    ServiceError,
    ShuttingDown,
    TooManyConnections,
    TooManyFiles,
    TooManyImages,
    TooManyModels,
    TooManyPixels,
    TopKOutOfRange,
    Unauthorized,
    UndecodableImage,
    UnknownModel,
    UnknownModelVersion,
    UnsupportedImageFormat,
    UnsupportedMediaType,
)

log = logging.getLogger("service.errors")
Handled = TypeVar("Handled", bound=Exception)

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}  # for errors Starlette raises


class ErrorBody(BaseModel):
    """Every error answer; some carry more fields that help fix the request."""

    error: str = Field(description="What went wrong, for people; may be reworded.")
    code: str = Field(description="Stable and machine-readable, e.g. unknown_model, too_many_images.")


# Each error's HTTP status and its stable, machine-readable `code`: clients branch on the code,
# people read the message, which may be reworded.
ERRORS: dict[type[ServiceError], tuple[int, str]] = {
    ServiceError: (500, "internal_error"),  # a subclass not listed below answers with its parent's entry
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
    BadHttpRequest: (400, "bad_http_request"),
    InvalidMultipart: (400, "invalid_multipart"),
    ShuttingDown: (503, "shutting_down"),
    MemoryExhausted: (503, "memory_exhausted"),
    ModelControlDisabled: (409, "model_control_disabled"),
    ModelLoadFailed: (400, "model_load_failed"),
    TooManyModels: (422, "too_many_models"),
}


def json_response(status_code: int, body: dict, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, headers=headers,
                    media_type="application/json")


def status_and_code(exc: ServiceError) -> tuple[int, str]:
    """The entry of the nearest class along the error's MRO; ServiceError's own if none nearer."""
    return next(ERRORS[kind] for kind in type(exc).__mro__ if kind in ERRORS)


def error_body(exc: ServiceError) -> tuple[int, dict]:
    status, code = status_and_code(exc)
    return status, {"error": exc.message, "code": code, **exc.details}


def error_response(exc: ServiceError) -> Response:
    status, body = error_body(exc)
    return json_response(status, body, headers=exc.headers or None)


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
        return json_response(405, {"error": f"method {request.method} not allowed on {request.url.path}; "
                                         f"allowed: {', '.join(allowed)}", "code": "method_not_allowed"},
                          headers=headers)
    if exc.status_code == 404 and exc.detail == "Not Found":
        body = {"error": f"no route {request.url.path}; see /docs"}
    body["code"] = HTTP_CODES.get(exc.status_code, "http_error")
    return json_response(exc.status_code, body, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = [{"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
                for e in exc.errors()]
    message = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
    return json_response(422, {"error": f"invalid request: {message}", "code": "invalid_request",
                            "problems": problems})


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return json_response(500, {"error": f"internal error: {type(exc).__name__}", "code": "internal_error"})


def install_error_handlers(app: FastAPI) -> None:
    _add_handler(app, ServiceError, _service_error)
    _add_handler(app, HTTPException, _http_error)
    _add_handler(app, RequestValidationError, _validation_error)
    _add_handler(app, Exception, _unexpected_error)


def _add_handler(app: FastAPI, kind: type[Handled],
                 handler: Callable[[Request, Handled], Awaitable[Response]]) -> None:
    # Starlette calls a handler only with an instance of the class it is registered for, which its
    # handler type (any Exception) cannot say: the cast says it, here, once.
    app.add_exception_handler(kind, cast(HTTPExceptionHandler, handler))

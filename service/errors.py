"""Every error a client can cause, as exception types that know nothing of HTTP.

They are raised near the cause (preprocess, engine, lifecycle, protocol adapters, the connection
layer); `service/error_responses.py` is the one place that turns each into an answer with a status
and a stable machine-readable `code`. Standard library only, so any module may raise them.
"""
from collections.abc import Mapping
from types import MappingProxyType

ACCEPTED_FORMATS = ["JPEG", "PNG", "WebP", "GIF (first frame)", "BMP", "TIFF"]
ACCEPTED_UPLOADS = ["multipart/form-data with the image in field 'file'",
                    "a raw body with Content-Type image/* or application/octet-stream (POST)",
                    "a raw body with PUT (curl -T)"]


class ServiceError(Exception):
    """A failure with a message for the client and extra JSON fields that help fix it."""

    headers: Mapping[str, str] = MappingProxyType({})  # HTTP headers the answer must carry, e.g. Retry-After

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
        super().__init__(f"the request body did not arrive within {timeout:g} s (BODY_TIMEOUT_SECONDS, "
                         "or what was left of REQUEST_TIMEOUT_SECONDS)", timeout_seconds=timeout)


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


class BadHttpRequest(ServiceError):
    """A request the HTTP parser cannot read, or one it would read wrongly."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"malformed HTTP request: {reason}")


class InvalidMultipart(ServiceError):
    """A multipart/form-data body that cannot be split into its parts."""

    def __init__(self, message: str) -> None:
        super().__init__(message, accepted_uploads=ACCEPTED_UPLOADS)


class ShuttingDown(ServiceError):
    """A request still at work when the server's graceful shutdown ran out of time."""

    def __init__(self) -> None:
        super().__init__("the server shut down before this request was done "
                         "(GRACEFUL_SHUTDOWN_SECONDS); retry it on another instance")


class MemoryExhausted(ServiceError):
    def __init__(self, budget: int, retry_after: int) -> None:
        super().__init__(f"the requests in flight hold the server's memory budget of {budget} bytes "
                         f"(MEMORY_BUDGET_BYTES); retry after {retry_after} s",
                         budget_bytes=budget, retry_after_seconds=retry_after)
        self.headers = {"Retry-After": str(retry_after)}


class ModelControlDisabled(ServiceError):
    """A repository load or unload while MODEL_CONTROL_MODE is none."""

    def __init__(self, action: str) -> None:
        super().__init__(f"model {action} is disabled: MODEL_CONTROL_MODE is none (set it to explicit "
                         "or poll to load and unload models while the service runs)", action=action)


class ModelLoadFailed(ServiceError):
    """A repository load call whose model could not be made ready; the reason names the check."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r} not loaded: {reason}", reason=reason)


class TooManyModels(ServiceError):
    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} models to compare; the limit is {limit} (MAX_COMPARE_MODELS): name "
                         "fewer with ?models=", limit=limit)

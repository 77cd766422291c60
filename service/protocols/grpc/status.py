"""Each error's gRPC status, by its stable `code` (service/error_responses.py's `ERRORS`, found along
the error's class hierarchy), so a client can act on it as on the HTTP status: UNAVAILABLE is worth
a retry, RESOURCE_EXHAUSTED and INVALID_ARGUMENT are not."""
from grpc import StatusCode

from service.error_responses import status_and_code
from service.errors import ServiceError

GRPC_STATUS: dict[str, StatusCode] = {
    "internal_error": StatusCode.INTERNAL,
    "unknown_model": StatusCode.NOT_FOUND,
    "unknown_model_version": StatusCode.NOT_FOUND,
    "model_unavailable": StatusCode.UNAVAILABLE,
    "empty_body": StatusCode.INVALID_ARGUMENT,
    "undecodable_image": StatusCode.INVALID_ARGUMENT,
    "invalid_inference_request": StatusCode.INVALID_ARGUMENT,
    "unsupported_media_type": StatusCode.INVALID_ARGUMENT,
    "missing_file_field": StatusCode.INVALID_ARGUMENT,
    "too_many_files": StatusCode.INVALID_ARGUMENT,
    "top_k_out_of_range": StatusCode.INVALID_ARGUMENT,
    "body_too_large": StatusCode.RESOURCE_EXHAUSTED,
    "image_too_large": StatusCode.RESOURCE_EXHAUSTED,
    "too_many_images": StatusCode.RESOURCE_EXHAUSTED,
    "too_many_pixels": StatusCode.RESOURCE_EXHAUSTED,
    "json_too_large": StatusCode.RESOURCE_EXHAUSTED,
    "body_timeout": StatusCode.DEADLINE_EXCEEDED,
    "client_closed_request": StatusCode.CANCELLED,
    "headers_too_large": StatusCode.RESOURCE_EXHAUSTED,
    "headers_timeout": StatusCode.DEADLINE_EXCEEDED,
    "too_many_connections": StatusCode.UNAVAILABLE,
    "unauthorized": StatusCode.UNAUTHENTICATED,
    "overloaded": StatusCode.UNAVAILABLE,
    "timeout": StatusCode.DEADLINE_EXCEEDED,
    "inference_failed": StatusCode.INTERNAL,
    "unsupported_image_format": StatusCode.INVALID_ARGUMENT,
    "image_too_complex": StatusCode.INVALID_ARGUMENT,
    "bad_http_request": StatusCode.INVALID_ARGUMENT,
    "invalid_multipart": StatusCode.INVALID_ARGUMENT,
    "shutting_down": StatusCode.UNAVAILABLE,
    "memory_exhausted": StatusCode.UNAVAILABLE,  # retryable, as its 503 with Retry-After
    "model_control_disabled": StatusCode.FAILED_PRECONDITION,
    "model_load_failed": StatusCode.INVALID_ARGUMENT,  # its 400: the load request is at fault
    "too_many_models": StatusCode.INVALID_ARGUMENT,  # /compare's, over MAX_COMPARE_MODELS
}


def grpc_status(exc: ServiceError) -> tuple[StatusCode, int, str]:
    """The error's gRPC status, with the HTTP status and the code it has on HTTP."""
    http_status, code = status_and_code(exc)
    return GRPC_STATUS.get(code, StatusCode.INTERNAL), http_status, code

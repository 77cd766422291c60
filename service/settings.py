"""The service's configuration: one object, each field an environment variable of the same name."""
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cores() -> int:
    # Respect a CPU affinity mask (containers, taskset) rather than the host's core count.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Settings(BaseSettings):
    # No prefix: the variables are named as the README documents them (MODEL_REPOSITORY, PORT...).
    model_config = SettingsConfigDict(protected_namespaces=(), extra="ignore")

    model_repository: Path = Field(Path("model_repository"),
                                   description="Folder holding one sub-folder per model.")
    host: str = Field("127.0.0.1", description="Address uvicorn binds to.")
    port: int = Field(8000, description="Port uvicorn listens on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    execution_provider: Literal["cpu", "cuda"] = Field(
        "cpu", description="cuda uses CUDAExecutionProvider when onnxruntime has it, else falls back to cpu.")
    intra_op_threads: PositiveInt = Field(
        default_factory=available_cores,
        description="onnxruntime threads for an inference that starts while no other runs; one "
                    "started beside others runs on one thread. 1 keeps one session per model (less "
                    "memory, measured in docs/benchmarks.md) at the cost of a slower lone request.")
    inter_op_threads: PositiveInt = Field(1, description="onnxruntime threads across graph branches.")
    inference_workers: PositiveInt | None = Field(
        None, description="Inferences run at once, across models; default: the core count.")
    max_batch_size: PositiveInt = Field(
        4, description="Most images one session.run takes when requests queued for a busy model; "
                       "1 turns dynamic batching off.")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="How long a queued request may wait for others to fill its batch; a "
                               "request that finds the model idle never waits.")
    intra_op_spinning: bool = Field(
        True, description="Let onnxruntime's threads spin for work while an inference runs (they "
                          "stop when it returns); off, they sleep between layers and an inference "
                          "takes longer (measured in docs/benchmarks.md).")
    cpu_memory_arena: bool = Field(
        False, description="Give each model onnxruntime's own memory arena; it keeps every model's "
                           "largest batch allocated, so it needs more memory (measured in "
                           "docs/benchmarks.md).")
    preprocess_workers: PositiveInt = Field(default_factory=available_cores,
                                            description="Threads decoding and preprocessing images.")
    warmup_runs: int = Field(2, ge=0, description="Inferences on a zero image per model before ready.")
    strict_readiness: bool = Field(
        True, description="Readiness stays 503 while any model failed to load (others keep serving).")
    model_control_mode: Literal["none", "explicit", "poll"] = Field(
        "none", description="none: every model is loaded at start and the repository API's load and "
                            "unload are refused; explicit: loaded at start (or only STARTUP_MODELS), "
                            "then only the API loads, reloads and unloads; poll: the repository is "
                            "scanned every REPOSITORY_POLL_SECONDS and changes are loaded and "
                            "unloaded as they appear.")
    version_policy: str = Field(
        "latest:1", pattern=r"^(latest:[1-9][0-9]*|all|specific:[1-9][0-9]*(,[1-9][0-9]*)*)$",
        description="Which versions of a model with numbered version folders are served: latest:K "
                    "(the K newest), all, or specific:1,3. A request without a version gets the "
                    "newest ready one.")
    startup_models: str = Field(
        "", description="Comma-separated models loaded at start in explicit mode; empty: all.")
    repository_poll_seconds: PositiveFloat = Field(
        5.0, description="How often poll mode scans the repository for added, changed and removed "
                         "models and versions.")
    max_loaded_models: int = Field(
        0, ge=0, description="Most models loaded at once (0: no bound). A request for a model not "
                             "loaded loads it (its Server-Timing has a `load` stage) after unloading "
                             "the least recently used model no request is using.")

    top_k: PositiveInt = Field(5, description="Default number of classes returned by /predict.")
    max_body_bytes: PositiveInt = Field(20 * 1024 * 1024, description="Largest request body accepted.")
    max_json_values: PositiveInt = Field(
        1_000_000, description="Most values (numbers, strings) an Open Inference Protocol JSON body "
                               "may hold, counted before parsing; 413 above. Binary tensor data is "
                               "not counted.")
    max_images_per_request: PositiveInt = Field(
        16, description="Most images (or tensor rows) one request may carry; 413 above.")
    max_request_pixels: PositiveInt = Field(
        100_000_000, description="Most pixels all the images of one request may hold together; 413 "
                                 "above, and the images not yet decoded are not decoded.")
    max_jpeg_scans: PositiveInt = Field(
        100, description="Most scans a JPEG may have (a progressive one has about 10); each scan is "
                         "decoded over the whole image, so more are refused with 422 before decoding.")
    max_image_pixels: PositiveInt = Field(40_000_000, description="Largest decoded image (width x height).")
    stats_window: PositiveInt = Field(10_000, description="Recent requests per model kept for percentiles.")
    max_compare_models: PositiveInt = Field(
        64, description="Most models one /compare may run; 422 above. Each takes one of its "
                        "model's in-flight slots while the comparison runs.")

    # Reliability: overload, time limits, shutdown, access.
    max_in_flight_per_model: PositiveInt = Field(
        32, description="Predictions of one model admitted at once (reading, preprocessing, queued or "
                        "running); past it a request is refused at once with 503 and Retry-After.")
    retry_after_seconds: PositiveInt = Field(1, description="Retry-After sent with an overload 503.")
    body_timeout_seconds: PositiveFloat = Field(
        10.0, description="Longest a prediction's body may take to arrive; past it, 408. The body "
                          "is read before the request takes one of its model's in-flight slots. A "
                          "body the app answered without reading is dropped until then, then the "
                          "connection is closed.")
    request_timeout_seconds: PositiveFloat = Field(
        10.0, description="Longest a prediction may take, from its start (body upload included) to "
                          "its answer; past it, 504.")
    drain_seconds: NonNegativeFloat = Field(
        0.0, description="After SIGTERM: readiness says 503 but requests are still served this long, "
                         "so a load balancer can stop sending traffic, before the listener closes.")
    graceful_shutdown_seconds: PositiveFloat = Field(
        10.0, description="After the listener closes, longest wait for requests in flight to finish.")
    memory_budget_bytes: PositiveInt | None = Field(
        None, description="Memory all predictions may hold at once: bodies being read (multipart "
                          "spools on disk included), decoded images and their working copies, "
                          "answers being sent. What a request will hold is reserved before it is "
                          "spent; past the budget a request is refused with 503 and Retry-After, "
                          "and an image needing more than a quarter of it with 422. Default: the "
                          "container's memory limit (cgroup) less the process's resident memory "
                          "once every model has loaded; without a limit, half of physical memory.")
    # Connections (service/connections.py): what a client must do before its request reaches the app.
    max_connections: PositiveInt | None = Field(
        None, description="Client connections open at once; past it a new one gets 503 with "
                          "Retry-After and is closed. Default: half the open files left after 128 kept "
                          "for the process itself (its soft limit is first raised to the hard one), "
                          "at most 10,000.")
    idle_timeout_seconds: PositiveFloat = Field(
        5.0, description="A connection with no request under way (new, or kept alive after an "
                         "answer) is closed after this long without a byte.")
    headers_timeout_seconds: PositiveFloat = Field(
        10.0, description="A request's line and headers must arrive within this long of its first "
                          "byte; past it, 408 and the connection is closed.")
    max_header_bytes: PositiveInt = Field(
        64 * 1024, description="Largest request line plus headers, and apart from them, largest "
                               "trailers plus chunk framing of a body; past it, 431 and the connection "
                               "is closed.")
    write_timeout_seconds: PositiveFloat = Field(
        10.0, description="An answer the client does not read is dropped, with its connection, once "
                          "the server's write buffer for it has stayed full this long.")
    admin_port: int = Field(
        8002, ge=0, le=65535, description="Port of the admin listener, on HOST: only /health/live, "
                                          "/health/ready (and their /v2 twins) and /metrics, with its "
                                          "own connection cap, so probes and scrapes are answered "
                                          "when clients hold every connection of PORT. 0: no admin "
                                          "listener.")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="Port of the Open Inference Protocol over gRPC "
                                          "(inference.GRPCInferenceService and grpc.health.v1), on "
                                          "HOST; its messages are bounded by MAX_BODY_BYTES, its "
                                          "connections by MAX_CONNECTIONS. 0: no gRPC listener.")
    api_key: SecretStr | None = Field(
        None, description="When set, predictions need `Authorization: Bearer <key>` or `X-API-Key: <key>`.")
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed to call the API from a browser ('*' for any); "
                        "empty: no CORS headers.")

    @field_validator("log_level", "execution_provider", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key would turn the check on while an empty X-API-Key header passes it.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("API_KEY is set but empty: set it to the key, or unset it to serve "
                             "without one")
        return value

    @property
    def cores(self) -> int:
        return available_cores()

    @property
    def resolved_inference_workers(self) -> int:
        return self.inference_workers or self.cores

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

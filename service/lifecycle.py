"""A prediction's life, one fixed sequence for every protocol:

    look the model up → start the deadline → read the body (bounded in bytes and time)
    → admit (in-flight limit) → decode the wire format → decode and preprocess the images
    → batch and infer → encode the answer (postprocessing, e.g. top-k, is the protocol's)

A protocol is an `Adapter` (`service/protocols/`): it reads its wire format into `Inputs` and writes
a `Result` back in its wire format, and nothing else. What carries the request is a `Call`: an HTTP
request (`HttpCall`) or a gRPC call (service/protocols/grpc/); the lifecycle asks it only for the
payload, whether the client has left, the client's own deadline and the request's record. Every
bound is enforced here, once, for all protocols: body bytes (the limit middleware counts what `read`
receives) and the time the body may take (within the request's deadline: a body that stalls is 408,
not 504), images per request, pixels per image and per request, the memory the request holds
(`service/budget.py`: its body, each image's working memory, its answer: the most its encoding
can take before inference, then its encoded size), in-flight requests per model and the request's
deadline. Past the deadline, or once the client has gone, none of the request's remaining work
runs: images not yet decoded are not decoded, and its place in the batch queue is dropped.

Bodies are parsed and images decoded in pools whose threads are shared fairly between models
(`service/fair_pool.py`), so one model's expensive requests cannot starve another's.

Where the model is idle, a lone image is decoded, preprocessed and inferred on one inference
worker (one hand-off from the event loop); otherwise each image is decoded in the preprocessing
pool, in parallel, and the batch queues for the model's inference workers.
"""
import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import Request, Response
from starlette.requests import ClientDisconnect

from contract import Preprocessing
from service import preprocess
from service.admission import Admission
from service.batching import Inference
from service.budget import RequestAccount
from service.engine import Engine, ServedModel
from service.errors import BodyTimedOut, ClientClosedRequest, TooManyImages, TooManyPixels
from service.fair_pool import FairPool
from service.metrics import server_timing
from service.preprocess import PreparedImage
from service.record import RequestRecord, record_of
from service.settings import Settings
from service.tracing import Stage, measured_stages

PARSER_THREADS = 2


@dataclass(frozen=True)
class Inputs:
    """What a request asks the model to classify: encoded images or the model's own tensor."""

    files: list[bytes] | None = None  # encoded image files, preprocessed as the model's metadata says
    tensor: np.ndarray | None = None   # (N, 3, H, W) float32, already preprocessed by the client
    options: Any = None                # the adapter's own request options, handed back in Result

    @property
    def count(self) -> int:
        return len(self.files) if self.files is not None else len(self.given_tensor)

    @property
    def given_tensor(self) -> np.ndarray:
        """The client's tensor, for Inputs made without image files."""
        if self.tensor is None:
            raise ValueError("these Inputs hold image files, not a tensor")
        return self.tensor


@dataclass(frozen=True)
class Result:
    model: ServedModel
    outputs: np.ndarray            # (N, classes): the model's output rows, in request order
    prepared: list[PreparedImage]  # each image sent, decoded and preprocessed; empty for a tensor
    timings: dict[str, float]      # ms per stage: read, decode, preprocess (images only), queue, inference, total
    options: Any


class Adapter(Protocol):
    """One protocol's wire format; see `service/protocols/`."""

    parses_body: bool  # decode parses the body (JSON, base64), so it runs off the event loop

    def decode(self, payload: Any, model: ServedModel) -> Inputs:
        """The payload as Inputs; raises a ServiceError saying what is wrong with it."""

    def encode(self, result: Result) -> Any:
        """The result in the protocol's wire format (an HTTP Response, a protobuf message)."""

    def answer_bytes(self, inputs: Inputs, model: ServedModel) -> int:
        """The most bytes the encoded answer to `inputs` can take, from the outputs they ask for:
        held for the answer before inference, so that one that could not fit costs nothing."""


class HttpAdapter(Adapter, Protocol):
    async def read(self, request: Request) -> Any:
        """The request's payload, read from the body."""


class Call(Protocol):
    """One request as the lifecycle sees it, whatever transport carries it."""

    time_left: float | None  # seconds the client still waits for its answer; None: no deadline

    @property
    def record(self) -> RequestRecord:
        """The request's record: its memory account; the lifecycle writes its timings there."""

    async def read(self) -> Any:
        """The payload, for the adapter's decode; ClientDisconnect if the client leaves meanwhile."""

    async def client_left(self) -> bool:
        """Called once the payload is read: returns True when the client leaves, False if it
        can no longer tell."""


@dataclass
class HttpCall:
    request: Request
    adapter: HttpAdapter
    time_left: float | None = None  # HTTP carries no deadline of the client's

    @property
    def record(self) -> RequestRecord:
        return record_of(self.request)

    async def read(self) -> Any:
        return await self.adapter.read(self.request)

    async def client_left(self) -> bool:
        # Once the body is read, the only message left is the disconnect.
        return (await self.request.receive())["type"] == "http.disconnect"


class Lifecycle:
    def __init__(self, engine: Engine, admission: Admission, settings: Settings) -> None:
        self.engine, self.admission, self.settings = engine, admission, settings
        self.pool = FairPool(settings.preprocess_workers, "preprocess")
        # One body per model parsed at a time: a JSON parser holds the GIL through a whole body
        # (about 0.1 s for 5 MB of numbers), so more at once would starve the event loop back to
        # back. Two threads, so that one model's slow bodies never hold up another model's.
        self.parser = FairPool(PARSER_THREADS, "parse", per_model=1)

    async def handle(self, request: Request, model_name: str, adapter: HttpAdapter,
                     version: str | None = None) -> Response:
        """An HTTP request's answer, with its stage timings in Server-Timing."""
        response: Response = await self.answer(HttpCall(request, adapter), model_name, adapter, version)
        if response.body:  # else built as it is sent, within what is held for it already
            record_of(request).memory.hold_answer(len(response.body))  # until sent: MemoryExhausted 503
        response.headers["Server-Timing"] = server_timing(record_of(request).server_timings())
        return response

    async def answer(self, call: Call, model_name: str, adapter: Adapter,
                     version: str | None = None) -> Any:
        """The adapter's encoding of the answer; the stage timings are in `call.record`."""
        started = time.perf_counter()
        # UnknownModel or UnknownModelVersion 404, ModelUnavailable 503; loaded first if evicted
        model, load_ms = await self.engine.acquire(model_name, version)
        account: RequestAccount = call.record.memory  # the body is reserved as it is read
        async with self.admission.deadline(model.name, call.time_left) as deadline, \
                self.engine.in_use(model):  # 504
            read_at = time.perf_counter()
            payload = await self._read(call, deadline)  # BodyTimedOut 408, gone 499
            read = Stage(read_at, (time.perf_counter() - read_at) * 1000)
            async with self.admission.admit(model.name), cancelled_when_client_leaves(call):
                if adapter.parses_body:
                    inputs = await self.parser.run(model.name, adapter.decode, payload, model)
                else:
                    inputs = adapter.decode(payload, model)
                if inputs.count > self.settings.max_images_per_request:
                    raise TooManyImages(inputs.count, self.settings.max_images_per_request)
                account.hold_answer(adapter.answer_bytes(inputs, model))  # MemoryExhausted 503
                images, inference = await self._infer(model, inputs, account)
        timings = {"load": load_ms} if load_ms else {}
        timings["read"] = read.duration_ms
        timings.update({"decode": sum(i.decode_ms for i in images),
                        "preprocess": sum(i.preprocess_ms for i in images)} if images else {})
        timings.update(queue=inference.queue_ms, inference=inference.inference_ms,
                       total=(time.perf_counter() - started) * 1000)
        record = call.record
        record.timings = timings  # for the metrics, the access log, the trace and Server-Timing
        encode_at = time.perf_counter()
        answer = adapter.encode(Result(model, inference.outputs, images, timings, inputs.options))
        record.stages = measured_stages(read, images, inference, timings, encode_at)
        record.batch = inference
        record.attributes.update(_attributes(model, adapter, images))
        return answer

    async def _read(self, call: Call, deadline: asyncio.Timeout) -> Any:
        """The body, within BODY_TIMEOUT_SECONDS and the request's own deadline: either way a body
        that does not arrive in time is the client's fault (408), not the server's (504)."""
        ends = deadline.when()
        if ends is None:  # admission's deadline always sets one
            raise RuntimeError("the request has no deadline")
        allowed = min(self.settings.body_timeout_seconds, ends - asyncio.get_running_loop().time())
        deadline.reschedule(None)  # the body's deadline below ends no later
        try:
            async with asyncio.timeout(allowed) as body_deadline:
                return await call.read()
        except TimeoutError:
            if not body_deadline.expired():
                raise
            raise BodyTimedOut(round(allowed, 3)) from None
        except ClientDisconnect:
            raise ClientClosedRequest() from None
        finally:
            deadline.reschedule(ends)

    async def _infer(self, model: ServedModel, inputs: Inputs, account: RequestAccount
                     ) -> tuple[list[PreparedImage], Inference]:
        images = inputs.files
        if images is None:
            tensor = inputs.given_tensor
            account.reserve(tensor.nbytes)  # the batch handed to onnxruntime is a copy
            return [], await self.engine.infer(model, tensor)
        prepare_one = functools.partial(
            preprocess.prepare, preprocessing=model.metadata.preprocessing,
            max_pixels=min(self.settings.max_image_pixels, self.settings.max_request_pixels),
            max_scans=self.settings.max_jpeg_scans, reserve=account.reserve,
            max_working_bytes=account.per_request)
        self.pool.asking(model.name)
        if len(images) == 1 and self.engine.idle(model):
            prepared: list[PreparedImage] = []

            def prepare() -> np.ndarray:  # on the inference worker that then runs the model
                prepared.append(prepare_one(images[0]))
                return prepared[0].tensor

            return prepared, await self.engine.infer(model, prepare)
        prepared = await self._prepare_all(model.name, images, prepare_one)
        batch = np.concatenate([p.tensor for p in prepared])
        return prepared, await self.engine.infer(model, batch)

    async def _prepare_all(self, model: str, images: list[bytes],
                           prepare_one: Callable[[bytes], PreparedImage]) -> list[PreparedImage]:
        """Each image decoded in the pool, in parallel; past the request's pixel budget the rest
        are cancelled before they start."""
        if len(images) == 1:  # no task to spawn; the pixel limit already bounds one image
            return [await self.pool.run(model, prepare_one, images[0])]
        spent = 0

        async def prepare(data: bytes) -> PreparedImage:
            nonlocal spent
            image = await self.pool.run(model, prepare_one, data)
            spent += image.width * image.height
            if spent > self.settings.max_request_pixels:
                raise TooManyPixels(self.settings.max_request_pixels)
            return image

        tasks = [asyncio.ensure_future(prepare(data)) for data in images]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    # For a request that shares one upload among several models (service/compare.py) ----------
    async def read(self, call: Call, deadline: asyncio.Timeout) -> Any:
        """The body, bounded in bytes and time as every request's, within `deadline`."""
        return await self._read(call, deadline)

    def decode(self, data: bytes, preprocessing: Preprocessing, account: RequestAccount
               ) -> preprocess.DecodedImage:
        """One image opened and decoded under the bounds every image has, its working memory
        reserved in `account`; on a pool thread."""
        return preprocess.decode(data, preprocessing,
                                 max_pixels=min(self.settings.max_image_pixels, self.settings.max_request_pixels),
                                 max_scans=self.settings.max_jpeg_scans, reserve=account.reserve,
                                 max_working_bytes=account.per_request)

    async def in_pool(self, owner: str, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in the preprocessing pool, on `owner`'s fair share of its threads."""
        return await self.pool.run(owner, function, *args)

    def close(self) -> None:
        for pool in (self.pool, self.parser):
            pool.shutdown()


def _attributes(model: ServedModel, adapter: Adapter, images: list[PreparedImage]) -> dict[str, str | int]:
    """What a person filters this request's trace by."""
    facts: dict[str, str | int] = {"model.file": model.onnx_file, "model.weights": model.metadata.weights.kind,
                                   "protocol": type(adapter).__name__.removesuffix("Adapter")}
    if images:
        facts.update({"image.width": images[0].width, "image.height": images[0].height,
                      "image.format": images[0].format, "image.count": len(images)})
    return facts


@asynccontextmanager
async def cancelled_when_client_leaves(call: Call) -> AsyncIterator[None]:
    """When the client goes, stop this request's work (what has not started never runs) and
    answer it as 499."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("a request's work runs in a task")
    gone = asyncio.Event()

    async def watch() -> None:
        if await call.client_left():
            gone.set()
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        task.uncancel()
        raise ClientClosedRequest() from None
    finally:
        watcher.cancel()



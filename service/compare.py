"""One upload, several models: the body is read and decoded once, preprocessed once per distinct
preprocessing, and then each model infers through its own in-flight slot and the batcher, all
within the request's one deadline.

Each model gets exactly the tensor its own `/predict` would have made. Models whose metadata says
the same preprocessing share one tensor. Decoding depends on the preprocessing only through JPEG
draft mode (libjpeg scaling by 1/2, 1/4 or 1/8 while decoding, never below an antialiased model's
resize): the preprocessings are taken from the smallest draft size up, and a decode is shared by
the next one when it asks for the same size, or when libjpeg did not scale it down (a larger size
would not be scaled either). A 600x400 photo is decoded once for every 224-pixel model, and once
more, reduced, for a 32-pixel one.

Before any work, the models are resolved: an unknown name is refused (404), as is a list longer
than MAX_COMPARE_MODELS. A model that cannot answer (loading or failed, at its in-flight limit,
a top_k beyond its classes, its inference failed) gets the error its own `/predict` would have
answered with in its entry, and the others still answer; when none can, the request answers with
the first model's error. A comparison that cannot be decoded is refused whole, as /predict would.

Metrics: each model's answer (or error) counts in that model's series with its queue, inference
and total; the shared read, decode and preprocessing count once, in the request's own record.

Traces: the shared stages are spans of the request's server span, as /predict's stages are; each
model gets a span `model <name>` (attribute `model`) with its own queue and inference spans under
it, and its error, if it has one, as that span's status.
"""
import asyncio
import functools
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from contract import Preprocessing
from service.admission import Admission
from service.batching import Inference
from service.budget import RequestAccount
from service.dataplane import DataPlane
from service.engine import Engine, ServedModel
from service.error_responses import status_and_code
from service.errors import ServiceError, TooManyModels, UnknownModel
from service.lifecycle import HttpAdapter, HttpCall, Inputs, Result, cancelled_when_client_leaves
from service.metrics import COMPARISON
from service.preprocess import DecodedImage, PreparedImage, to_tensor
from service.record import record_of
from service.tracing import ServerSpan, Stage, Tracing

Decode = Callable[[bytes, Preprocessing], DecodedImage]
TENSOR_BYTES_PER_PIXEL = 3 * 4  # float32 RGB
OWN_STAGES = ("load", "queue", "inference", "total")  # a model's own part of a comparison, in its series


@dataclass(frozen=True)
class Entry:
    """One model's part of a comparison: its result, or the error its /predict would answer with."""

    name: str
    result: Result | None = None
    error: ServiceError | None = None
    lasted: Stage | None = None         # its own part: admission, or its wait and inference
    inference: Inference | None = None  # its run: its queue and inference stages, its batch


@dataclass(frozen=True)
class Comparison:
    entries: list[Entry]        # in the order the models were named
    image: PreparedImage        # one of the prepared images: the upload's size and format
    timings: dict[str, float]   # ms: read, decode and preprocess (each done once), total


@dataclass(frozen=True)
class Prepared:
    images: dict[Preprocessing, PreparedImage]
    decode_ms: float       # all decodes made
    preprocess_ms: float   # all tensors made
    started: float         # perf_counter when the first decode began


def chosen_models(engine: Engine, names: list[str] | None, limit: int) -> list[str]:
    """The named models (each once, in order), or every ready one; UnknownModel or TooManyModels."""
    if not names:
        ready = [name for name, state in engine.models.items() if state.status == "ready"]
        names = ready or list(engine.models)[:1]  # none ready: the first one's error answers
        if not names:
            raise UnknownModel("", [])
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in engine.models:
            raise UnknownModel(name, sorted(engine.models))
    if len(names) > limit:
        raise TooManyModels(len(names), limit)
    return names


async def compare(plane: DataPlane, request: Request, names: list[str], adapter: HttpAdapter,
                  sequential: bool) -> Comparison:
    """Read the upload once, prepare it once per preprocessing, and run each named model on it."""
    started = time.perf_counter()
    lifecycle, admission, engine = plane.lifecycle, plane.admission, plane.engine
    account: RequestAccount = record_of(request).memory  # the body is reserved as it is read
    errors: dict[str, Entry] = {}
    call = HttpCall(request, adapter)
    async with admission.deadline(COMPARISON) as deadline:  # RequestTimedOut 504: the whole comparison
        payload = await lifecycle.read(call, deadline)  # BodyTimedOut 408, gone 499
        read_ms = (time.perf_counter() - started) * 1000
        async with AsyncExitStack() as held, cancelled_when_client_leaves(call):
            admitted: dict[str, Admitted] = {}
            for name in names:
                admitting = time.perf_counter()
                try:
                    admitted[name] = await _admit(engine, admission, held, name, adapter, payload)
                except ServiceError as error:
                    errors[name] = Entry(name, error=error, lasted=_since(admitting))
            if not admitted:
                raise errors[names[0]].error or RuntimeError("an entry without a result has an error")
            decode = functools.partial(lifecycle.decode, account=account)
            prepared = await lifecycle.in_pool(COMPARISON, prepare, decode, payload, account.reserve,
                                               [a.model.metadata.preprocessing for a in admitted.values()])
            outcomes = {**errors, **await _infer_each(engine, admitted, prepared, read_ms, sequential)}
    entries = [outcomes[name] for name in names]
    _count(plane, entries)
    record = record_of(request)
    record.stages = {"read": Stage(started, read_ms), "decode": Stage(prepared.started, prepared.decode_ms),
                     "preprocess": Stage(prepared.started + prepared.decode_ms / 1000, prepared.preprocess_ms)}
    if record.span is not None:
        for entry in entries:
            _trace(plane.tracing, record.span, entry)
    image = next(iter(prepared.images.values()))
    return Comparison(entries, image, {"read": read_ms, "decode": prepared.decode_ms,
                                       "preprocess": prepared.preprocess_ms,
                                       "total": (time.perf_counter() - started) * 1000})


@dataclass(frozen=True)
class Admitted:
    model: ServedModel
    inputs: Inputs
    load_ms: float  # loading it first, when MAX_LOADED_MODELS had left it out; else 0


async def _admit(engine: Engine, admission: Admission, held: AsyncExitStack, name: str, adapter: HttpAdapter,
                 payload: Any) -> Admitted:
    """The model, held and admitted for the comparison, as its /predict would be; or its error."""
    model, load_ms = await engine.acquire(name)  # ModelUnavailable 503; loaded first if evicted
    inputs = adapter.decode(payload, model)  # the model's own options, e.g. top_k
    await held.enter_async_context(engine.in_use(model))
    await held.enter_async_context(admission.admit(name))  # Overloaded 503
    return Admitted(model, inputs, load_ms)


def _since(started: float) -> Stage:
    return Stage(started, (time.perf_counter() - started) * 1000)


def _trace(tracing: Tracing, server: ServerSpan, entry: Entry) -> None:
    """The model's span under the request's server span: its queue and inference spans, its error."""
    code = status_and_code(entry.error)[1] if entry.error is not None else None
    inference = entry.inference
    attributes: dict[str, str | int] = {"model": entry.name}
    if entry.result is not None:
        attributes.update({"model.file": entry.result.model.onnx_file,
                           "model.weights": entry.result.model.metadata.weights.kind})
    if inference is not None:
        attributes["batch.size"] = inference.batch_size
    stages = {} if inference is None else {"queue": Stage(inference.submitted, inference.queue_ms),
                                           "inference": Stage(inference.started, inference.inference_ms)}
    if entry.lasted is not None:
        tracing.model_span(server, f"model {entry.name}", entry.lasted, stages, attributes, code)
    if inference is not None:
        tracing.batch_span(entry.name, inference)


def _count(plane: DataPlane, entries: list[Entry]) -> None:
    """Each model's part in its own series; the shared stages are the request record's."""
    for entry in entries:
        if entry.result is not None:
            timings = entry.result.timings
            plane.metrics.observe_request(entry.name, 200, {stage: timings[stage] for stage in OWN_STAGES
                                                            if stage in timings})
        elif entry.error is not None:
            plane.metrics.observe_request(entry.name, status_and_code(entry.error)[0], None)


def prepare(decode: Decode, data: bytes, reserve: Callable[[int], None],
            preprocessings: Iterable[Preprocessing]) -> Prepared:
    """Each distinct preprocessing's tensor, from as few decodes as give each one the decode its
    own /predict would make (see the module's docstring); on a pool thread. A decode reserves its
    own working memory; a tensor made from a shared decode reserves its size."""
    images: dict[Preprocessing, PreparedImage] = {}
    first = time.perf_counter()
    decoded, drafted, decode_ms, decodes_ms, tensors_ms = None, 0.0, 0.0, 0.0, 0.0
    for preprocessing in sorted(set(preprocessings), key=_draft_size):
        if decoded is None or (_draft_size(preprocessing) != drafted and _reduced(decoded)):
            started = time.perf_counter()
            decoded, drafted = decode(data, preprocessing), _draft_size(preprocessing)
            decode_ms = (time.perf_counter() - started) * 1000
            decodes_ms += decode_ms
        elif images:
            reserve(TENSOR_BYTES_PER_PIXEL * preprocessing.crop ** 2)
        started = time.perf_counter()
        tensor = to_tensor(decoded.image, preprocessing)
        preprocess_ms = (time.perf_counter() - started) * 1000
        tensors_ms += preprocess_ms
        images[preprocessing] = PreparedImage(tensor, decoded.width, decoded.height, decoded.format,
                                              decode_ms, preprocess_ms)
    return Prepared(images, decodes_ms, tensors_ms, first)


def _draft_size(preprocessing: Preprocessing) -> float:
    """The size JPEG draft mode decodes to at least; infinite where it is not used."""
    return preprocessing.resize if preprocessing.antialias else math.inf


def _reduced(decoded: DecodedImage) -> bool:
    """Whether libjpeg scaled the image down while decoding it."""
    return decoded.image.size != (decoded.width, decoded.height)


async def _infer_each(engine: Engine, admitted: dict[str, Admitted], prepared: Prepared, read_ms: float,
                      sequential: bool) -> dict[str, Entry]:
    async def infer(name: str) -> Entry:
        model = admitted[name].model
        image = prepared.images[model.metadata.preprocessing]
        submitted = time.perf_counter()
        try:
            inference = await engine.infer(model, image.tensor)
        except ServiceError as error:  # InferenceFailed: this model's entry only
            return Entry(name, error=error, lasted=_since(submitted))
        # What this model's own /predict would have taken: the shared stages it needed, and its
        # own wait and inference (not the other models').
        own_ms = (time.perf_counter() - submitted) * 1000
        load_ms = admitted[name].load_ms
        timings = {"load": load_ms} if load_ms else {}
        timings.update(read=read_ms, decode=image.decode_ms, preprocess=image.preprocess_ms, queue=inference.queue_ms,
                       inference=inference.inference_ms,
                       total=load_ms + read_ms + image.decode_ms + image.preprocess_ms + own_ms)
        result = Result(model, inference.outputs, [image], timings, admitted[name].inputs.options)
        return Entry(name, result=result, lasted=Stage(submitted, own_ms), inference=inference)

    if sequential:  # one after another, so that their latencies do not interfere
        return {name: await infer(name) for name in admitted}
    return dict(zip(admitted, await asyncio.gather(*(infer(name) for name in admitted)), strict=True))

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
"""
import asyncio
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from fastapi import Request

from contract import Preprocessing
from service.dataplane import DataPlane
from service.engine import Engine, ServedModel
from service.error_responses import status_and_code
from service.errors import ServiceError, TooManyModels, UnknownModel
from service.lifecycle import Adapter, Inputs, Result, cancelled_when_client_leaves
from service.metrics import COMPARISON
from service.preprocess import DecodedImage, PreparedImage, to_tensor

Decode = Callable[[bytes, Preprocessing], DecodedImage]
OWN_STAGES = ("queue", "inference", "total")  # a model's own part of a comparison, in its series


@dataclass(frozen=True)
class Entry:
    """One model's part of a comparison: its result, or the error its /predict would answer with."""

    name: str
    result: Result | None = None
    error: ServiceError | None = None


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


async def compare(plane: DataPlane, request: Request, names: list[str], adapter: Adapter,
                  sequential: bool) -> Comparison:
    """Read the upload once, prepare it once per preprocessing, and run each named model on it."""
    started = time.perf_counter()
    lifecycle, admission = plane.lifecycle, plane.admission
    errors: dict[str, ServiceError] = {}
    async with admission.deadline(COMPARISON):  # RequestTimedOut 504: the whole comparison
        payload = await lifecycle.read(request, adapter)  # BodyTimedOut 408, client gone 499
        read_ms = (time.perf_counter() - started) * 1000
        async with AsyncExitStack() as slots, cancelled_when_client_leaves(request):
            admitted: dict[str, Inputs] = {}
            for name in names:
                try:
                    model = plane.engine.model(name)  # ModelUnavailable 503
                    inputs = adapter.decode(payload, model)  # the model's own options, e.g. top_k
                    await slots.enter_async_context(admission.admit(name))  # Overloaded 503
                    admitted[name] = inputs
                except ServiceError as error:
                    errors[name] = error
            if not admitted:
                raise errors[names[0]]
            models = {name: plane.engine.model(name) for name in admitted}
            prepared = await lifecycle.in_pool(prepare, lifecycle.decode, payload,
                                               [m.metadata.preprocessing for m in models.values()])
            results = await _infer_each(plane.engine, models, admitted, prepared, read_ms, sequential)
    entries = [_entry(name, results.get(name) or errors[name]) for name in names]
    _count(plane, entries)
    image = next(iter(prepared.images.values()))
    return Comparison(entries, image, {"read": read_ms, "decode": prepared.decode_ms,
                                       "preprocess": prepared.preprocess_ms,
                                       "total": (time.perf_counter() - started) * 1000})


def _entry(name: str, outcome: Result | ServiceError) -> Entry:
    return Entry(name, error=outcome) if isinstance(outcome, ServiceError) else Entry(name, result=outcome)


def _count(plane: DataPlane, entries: list[Entry]) -> None:
    """Each model's part in its own series; the shared stages are the request record's."""
    for entry in entries:
        if entry.result is not None:
            timings = entry.result.timings
            plane.metrics.observe_request(entry.name, 200, {stage: timings[stage] for stage in OWN_STAGES})
        elif entry.error is not None:
            plane.metrics.observe_request(entry.name, status_and_code(entry.error)[0], None)


def prepare(decode: Decode, data: bytes, preprocessings: Iterable[Preprocessing]) -> Prepared:
    """Each distinct preprocessing's tensor, from as few decodes as give each one the decode its
    own /predict would make (see the module's docstring); on a pool thread."""
    images: dict[Preprocessing, PreparedImage] = {}
    decoded, drafted, decode_ms, decodes_ms, tensors_ms = None, 0.0, 0.0, 0.0, 0.0
    for preprocessing in sorted(set(preprocessings), key=_draft_size):
        if decoded is None or (_draft_size(preprocessing) != drafted and _reduced(decoded)):
            started = time.perf_counter()
            decoded, drafted = decode(data, preprocessing), _draft_size(preprocessing)
            decode_ms = (time.perf_counter() - started) * 1000
            decodes_ms += decode_ms
        started = time.perf_counter()
        tensor = to_tensor(decoded.image, preprocessing)
        preprocess_ms = (time.perf_counter() - started) * 1000
        tensors_ms += preprocess_ms
        images[preprocessing] = PreparedImage(tensor, decoded.width, decoded.height, decoded.format,
                                              decode_ms, preprocess_ms)
    return Prepared(images, decodes_ms, tensors_ms)


def _draft_size(preprocessing: Preprocessing) -> float:
    """The size JPEG draft mode decodes to at least; infinite where it is not used."""
    return preprocessing.resize if preprocessing.antialias else math.inf


def _reduced(decoded: DecodedImage) -> bool:
    """Whether libjpeg scaled the image down while decoding it."""
    return decoded.image.size != (decoded.width, decoded.height)


async def _infer_each(engine: Engine, models: dict[str, ServedModel], inputs: dict[str, Inputs],
                      prepared: Prepared, read_ms: float, sequential: bool) -> dict[str, Result | ServiceError]:
    async def infer(name: str) -> Result | ServiceError:
        model = models[name]
        image = prepared.images[model.metadata.preprocessing]
        submitted = time.perf_counter()
        try:
            inference = await engine.infer(model, image.tensor)
        except ServiceError as error:  # InferenceFailed: this model's entry only
            return error
        # What this model's own /predict would have taken: the shared stages it needed, and its
        # own wait and inference (not the other models').
        own_ms = (time.perf_counter() - submitted) * 1000
        timings = {"decode": image.decode_ms, "preprocess": image.preprocess_ms,
                   "queue": inference.queue_ms, "inference": inference.inference_ms,
                   "total": read_ms + image.decode_ms + image.preprocess_ms + own_ms}
        return Result(model, inference.outputs, [image], timings, inputs[name].options)

    if sequential:  # one after another, so that their latencies do not interfere
        return {name: await infer(name) for name in models}
    return dict(zip(models, await asyncio.gather(*(infer(name) for name in models)), strict=True))

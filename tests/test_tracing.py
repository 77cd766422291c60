"""Traces in process, caught by the SDK's in-memory exporter: a request continues its caller's trace,
each stage is a span exactly as long as the stage in `timings_ms`, and the requests that shared one
batched inference are linked from its span."""
import asyncio
import re
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.app import create_app
from service.dataplane import data_plane
from service.settings import Settings
from service.tracing import Tracing, enabled_by
from tests.onnx_models import write_small_repository

MODEL = "small_imagenet"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
STAGES = ("read", "decode", "preprocess", "queue", "inference", "encode")


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@asynccontextmanager
async def serving(repository, spans: InMemorySpanExporter, **settings):
    tracing = Tracing(SimpleSpanProcessor(spans))
    app = create_app(Settings(model_repository=repository, warmup_runs=0, **settings), tracing)
    async with app.router.lifespan_context(app):
        while not data_plane(app).engine.loading_done:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


def predict(client: httpx.AsyncClient, image: bytes, **headers: str):
    return client.put(f"/predict/{MODEL}", content=image, headers=headers)


def test_a_request_with_a_traceparent_continues_that_trace_with_a_span_per_stage(
        small_repository, photos, spans):
    async def scenario():
        async with serving(small_repository, spans) as client:
            return await predict(client, photos["coffee"].read_bytes(), traceparent=TRACEPARENT)

    response = asyncio.run(scenario())
    assert response.status_code == 200
    finished = {span.name: span for span in spans.get_finished_spans()}
    server = finished["PUT /predict/{model}"]
    assert server.kind == SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert response.headers["traceresponse"] == f"00-{TRACE_ID}-{server.context.span_id:016x}-01"
    assert server.attributes["model"] == MODEL and server.attributes["http.response.status_code"] == 200
    assert server.attributes["image.format"] == "JPEG" and server.attributes["batch.size"] == 1
    timings = response.json()["timings_ms"]
    assert set(STAGES) - set(timings) == {"encode"}  # the body cannot time its own encoding...
    sent = {name: float(ms) for name, ms in re.findall(r"(\w+);dur=([\d.]+)", response.headers["Server-Timing"])}
    assert set(STAGES) <= set(sent)  # ...Server-Timing, sent after it, does
    for stage in STAGES:
        span = finished[stage]
        assert span.parent.span_id == server.context.span_id
        assert span.start_time >= server.start_time and span.end_time <= server.end_time
        assert abs((span.end_time - span.start_time) / 1e6 - sent[stage]) <= 0.1, stage
        if stage in timings:
            assert abs((span.end_time - span.start_time) / 1e6 - timings[stage]) <= 0.1, stage


def lasted_ms(span) -> float:
    return (span.end_time - span.start_time) / 1e6


def test_a_comparison_traces_its_shared_stages_and_each_models_own_with_its_error(tmp_path, photos, spans):
    repository = write_small_repository(tmp_path / "repository")
    for onnx in (repository / "small_cifar").glob("*.onnx"):
        onnx.write_bytes(onnx.read_bytes() + b"changed")  # fails its hash check: model_unavailable

    async def scenario():
        async with serving(repository, spans, strict_readiness=False) as client:
            return await client.post("/compare?models=small_imagenet,small_cifar", headers={"traceparent": TRACEPARENT},
                                     files={"file": photos["coffee"].read_bytes()})

    response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    body = response.json()
    finished = spans.get_finished_spans()
    server = next(span for span in finished if span.name == "POST /compare")
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN and f"{server.context.trace_id:032x}" == TRACE_ID
    under = {span.name: span for span in finished if span.parent and span.parent.span_id == server.context.span_id}
    for stage in ("read", "decode", "preprocess"):
        assert abs(lasted_ms(under[stage]) - body["timings_ms"][stage]) <= 0.1, stage

    answered = under["model small_imagenet"]
    assert answered.attributes["model"] == MODEL and answered.status.status_code == StatusCode.UNSET
    own = {span.name: span for span in finished if span.parent and span.parent.span_id == answered.context.span_id}
    for stage in ("queue", "inference"):  # the model is on their parent, the model's span
        assert abs(lasted_ms(own[stage]) - body["results"][MODEL]["timings_ms"][stage]) <= 0.1, stage

    failed = under["model small_cifar"]
    assert body["results"]["small_cifar"]["code"] == "model_unavailable"
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "model_unavailable"
    assert failed.attributes["error.code"] == "model_unavailable"
    assert server.status.status_code == StatusCode.UNSET  # the comparison itself answered


def infer_tensor(client: httpx.AsyncClient):
    """One zero image as the model's own tensor (Open Inference Protocol, binary): no decoding, so
    concurrent requests reach the batcher together."""
    rows = np.zeros((1, 3, 224, 224), np.float32)
    header = httpx.Request("POST", "/", json={"inputs": [
        {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": rows.nbytes}}]}).content
    return client.post(f"/v2/models/{MODEL}/infer", content=header + rows.tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(header))})


def test_requests_that_share_a_batched_inference_are_linked_from_its_span(small_repository, spans):
    async def scenario():
        # One worker: the first request runs alone, the next eight queue and fill one batch.
        async with serving(small_repository, spans, inference_workers=1, max_batch_size=8,
                           max_queue_delay_ms=2000) as client:
            return await asyncio.gather(*(infer_tensor(client) for _ in range(9)))

    responses = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses)
    finished = spans.get_finished_spans()
    servers = {span.context.span_id: span for span in finished if span.kind == SpanKind.SERVER}
    batches = [span for span in finished if span.name == "batch"]
    assert batches, "no batch span"
    shared = max(batches, key=lambda span: len(span.links))
    assert len(shared.links) >= 2
    linked = [servers[link.context.span_id] for link in shared.links]
    assert {span.attributes["batch.size"] for span in linked} == {len(shared.links)}
    for server in linked:
        inference = next(s for s in finished if s.name == "inference" and s.parent.span_id == server.context.span_id)
        assert inference.attributes["batch.size"] == len(shared.links)
    assert len({span.context.trace_id for span in linked}) == len(linked)  # each its own trace


def test_an_error_sets_the_server_span_status_with_its_code(small_repository, spans):
    async def scenario():
        async with serving(small_repository, spans) as client:
            return await predict(client, b"not an image", traceparent=TRACEPARENT)

    response = asyncio.run(scenario())
    assert response.status_code == 400
    server = next(s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER)
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes["error.code"] == response.json()["code"]
    assert server.status.description == response.json()["code"]


def test_the_sampler_named_by_the_environment_decides_and_a_callers_decision_is_kept(
        small_repository, photos, spans, monkeypatch):
    # Sample nothing of our own; follow the caller's flag when it sends one.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    image = photos["coffee"].read_bytes()

    async def scenario():
        async with serving(small_repository, spans) as client:
            return [await predict(client, image), await predict(client, image, traceparent=TRACEPARENT),
                    await predict(client, image, traceparent=TRACEPARENT[:-2] + "00")]

    own, sampled, unsampled = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in (own, sampled, unsampled))
    assert own.headers["traceresponse"].endswith("-00") and TRACE_ID not in own.headers["traceresponse"]
    assert unsampled.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")
    assert unsampled.headers["traceresponse"].endswith("-00")
    assert sampled.headers["traceresponse"].endswith("-01")
    finished = spans.get_finished_spans()
    assert {f"{span.context.trace_id:032x}" for span in finished} == {TRACE_ID}  # only the sampled request's
    server = next(s for s in finished if s.kind == SpanKind.SERVER)
    assert sampled.headers["traceresponse"] == f"00-{TRACE_ID}-{server.context.span_id:016x}-01"
    assert {span.name for span in finished} >= {server.name, *STAGES}


def test_probes_are_not_traced(small_repository, spans):
    async def scenario():
        async with serving(small_repository, spans) as client:
            await client.get("/health/live")
            await client.get("/metrics")

    asyncio.run(scenario())
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize("environ, on", [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "cnn-serve"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
])
def test_tracing_is_on_only_when_an_exporter_or_endpoint_is_named_and_the_sdk_not_disabled(environ, on):
    assert enabled_by(environ) is on

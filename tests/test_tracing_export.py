"""Traces from a real server process, configured only by the standard OTEL_* variables, reaching a
tiny OTLP/HTTP collector in the test; the access log and the OpenMetrics exemplars carry the trace
id; without the variables nothing is traced; a collector that never answers costs spans, not
latency."""
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.otlp_receiver import Collector
from tests.service_fixtures import logged, metric

MODEL = "small_imagenet"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
QUICK_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms: the batch processor sends within the test


@pytest.fixture(scope="module")
def served_repository(small_repository):
    return small_repository


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.server.shutdown()


@contextmanager
def silent_collector() -> Iterator[str]:
    """A port that accepts connections and never reads or answers them."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def predict(server, photos, **headers: str) -> httpx.Response:
    return httpx.put(f"{server.url}/predict/{MODEL}", content=photos["coffee"].read_bytes(),
                     headers=headers, timeout=30)


def test_spans_reach_the_collector_named_by_the_otel_variables(served, collector, photos):
    server = served([MODEL], OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, OTEL_SERVICE_NAME="vision-edge",
                    **QUICK_EXPORT)
    response = predict(server, photos, traceparent=TRACEPARENT)
    assert response.status_code == 200
    assert response.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")
    spans = collector.wait_for(TRACE_ID, 7)
    names = {span.name for _, span in spans}
    assert {"PUT /predict/{model}", "read", "decode", "preprocess", "queue", "inference", "encode"} <= names
    assert {resource["service.name"] for resource, _ in spans} == {"vision-edge"}

    server_span_id = response.headers["traceresponse"].split("-")[2]
    pattern = rf"trace_id={TRACE_ID} span_id={server_span_id} model={MODEL} status=200"
    assert re.search(pattern, logged(server, pattern))
    openmetrics = httpx.get(f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert f'# {{span_id="{server_span_id}",trace_id="{TRACE_ID}"}}' in openmetrics.text
    prometheus = httpx.get(f"{server.url}/metrics")
    assert prometheus.headers["content-type"].startswith("text/plain")
    assert TRACE_ID not in prometheus.text


def attribute(span, key: str):
    value = next(a.value for a in span.attributes if a.key == key)
    return getattr(value, value.WhichOneof("value"))


def test_a_grpc_call_with_a_traceparent_in_its_metadata_continues_that_trace(served, collector, photos):
    server = served([MODEL], OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, **QUICK_EXPORT)
    trace_id, caller = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([photos["coffee"].read_bytes()], dtype=object))
    with triton.InferenceServerClient(server.grpc_address) as client:  # tritonclient: headers= is metadata
        client.infer(MODEL, [image], headers={"traceparent": f"00-{trace_id}-{caller}-01"})
    spans = {span.name: span for _, span in collector.wait_for(trace_id, 7)}
    rpc = spans["inference.GRPCInferenceService/ModelInfer"]
    assert rpc.parent_span_id.hex() == caller and rpc.kind == rpc.SPAN_KIND_SERVER
    assert attribute(rpc, "protocol") == "grpc" and attribute(rpc, "rpc.grpc.status_code") == 0
    assert attribute(rpc, "model") == MODEL and attribute(rpc, "image.format") == "JPEG"
    for stage in ("read", "decode", "preprocess", "queue", "inference", "encode"):
        assert spans[stage].parent_span_id == rpc.span_id, stage
    assert attribute(spans["inference"], "batch.size") == 1

    # The trace id comes back in the initial metadata, as HTTP's `traceresponse` header; each stage
    # lasts what the trailing metadata's Server-Timing says.
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    jpeg = photos["coffee"].read_bytes()
    request.raw_input_contents.append(len(jpeg).to_bytes(4, "little") + jpeg)
    second_trace = "c0ffee00c0ffee00c0ffee00c0ffee00"
    traceparent = f"00-{second_trace}-{caller}-01"
    with grpc.insecure_channel(server.grpc_address) as channel:
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            request, metadata=(("traceparent", traceparent),))
    traceresponse = dict(call.initial_metadata())["traceresponse"]
    assert traceresponse.startswith(f"00-{second_trace}-") and traceresponse.endswith("-01")
    server_span_id = traceresponse.split("-")[2]
    timings = {name: float(duration) for name, duration in
               re.findall(r"(\w+);dur=([\d.]+)", dict(call.trailing_metadata())["server-timing"])}
    stages = {span.name: span for _, span in collector.wait_for(second_trace, 7)
              if span.parent_span_id.hex() == server_span_id}
    for stage in ("read", "decode", "preprocess", "queue", "inference", "encode"):
        lasted_ms = (stages[stage].end_time_unix_nano - stages[stage].start_time_unix_nano) / 1e6
        assert abs(lasted_ms - timings[stage]) <= 0.1, stage
    pattern = rf"trace_id={second_trace} span_id={server_span_id} model={MODEL} status=200"
    assert re.search(pattern, logged(server, pattern))

    refused_trace = "badc0ffeebadc0ffeebadc0ffeebadc0"
    request.model_name = "no_such_model"
    with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=(("traceparent", f"00-{refused_trace}-{caller}-01"),))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    [(_, failed)] = collector.wait_for(refused_trace, 1)
    assert failed.status.code == failed.status.STATUS_CODE_ERROR and failed.status.message == "unknown_model"
    assert attribute(failed, "error.code") == "unknown_model" and attribute(failed, "rpc.grpc.status_code") == 5


def test_without_the_variables_or_with_the_sdk_disabled_nothing_is_traced(served, photos):
    collector = Collector()
    plain = served([MODEL], **QUICK_EXPORT)
    disabled = served([MODEL], OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, OTEL_SDK_DISABLED="true",
                      **QUICK_EXPORT)
    for server in (plain, disabled):
        response = predict(server, photos, traceparent=TRACEPARENT)
        assert response.status_code == 200 and "traceresponse" not in response.headers
        assert "trace_id=" not in logged(server, rf"PUT /predict/{MODEL} .*status=200")
    time.sleep(0.5)  # ten times the schedule delay
    collector.server.shutdown()
    assert collector.spans == []


def test_a_collector_that_never_answers_costs_spans_not_latency(served, photos):
    with silent_collector() as endpoint:
        server = served([MODEL], OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_BSP_MAX_QUEUE_SIZE="8",
                        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
                        **QUICK_EXPORT)
        latencies = []
        for _ in range(40):
            started = time.perf_counter()
            assert predict(server, photos).status_code == 200
            latencies.append(time.perf_counter() - started)
        text = httpx.get(f"{server.url}/metrics").text
    assert max(latencies) < 2.0, latencies  # an export blocking a request would wait out its timeout
    assert metric(text, "cnn_serve_trace_spans_dropped_total", reason="queue_full") > 0

"""Issue 22: the model repository changes while the service runs. Versions, Triton's repository
extension driven by the official tritonclient, safe hot reload in poll mode and MAX_LOADED_MODELS.
Small ONNX models (tests/onnx_models.py): each version is the same graph with other random weights."""
import asyncio
import dataclasses
import gc
import shutil
import threading
import time
import weakref
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from contract import LABELS_FILE, METADATA_FILE, MODEL_FILE, discover
from service.engine import Engine, ServedModel
from service.metrics import Metrics
from service.model_control import ModelControl
from service.settings import Settings
from tests.onnx_models import SMALL_CIFAR, write_model_folder
from tests.service_fixtures import metric, running_server, slow_png

MODEL = SMALL_CIFAR.name
KEY = "control-key"


def serve(tmp_path: Path, repository: Path, **env: str):
    server = running_server(repository, tmp_path / "service.log", **env)
    return server


def tensor(seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 3, 32, 32)).astype(np.float32)


def triton_infer(client: triton.InferenceServerClient, version: str = "") -> tuple[np.ndarray, str]:
    given = triton.InferInput("input", [1, 3, 32, 32], "FP32")
    given.set_data_from_numpy(tensor())
    answer = client.infer(MODEL, [given], model_version=version,
                          outputs=[triton.InferRequestedOutput("logits")])
    return answer.as_numpy("logits"), answer.get_response()["model_version"]


def direct(folder: Path) -> np.ndarray:
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": tensor()})[0]


def index(client: triton.InferenceServerClient) -> dict[tuple[str, str], dict]:
    return {(e["name"], e.get("version", "")): e for e in client.get_model_repository_index()}


@pytest.fixture
def repository(tmp_path) -> Path:
    """small_cifar in versions 1 and 2 (weights from seeds 1 and 2)."""
    repository = tmp_path / "repository"
    for version in (1, 2):
        write_model_folder(repository, SMALL_CIFAR, seed=version, version=version)
    return repository


def test_each_version_answers_with_its_own_weights_and_the_newest_by_default(tmp_path, repository):
    with serve(tmp_path, repository, MODEL_CONTROL_MODE="explicit", VERSION_POLICY="all") as server:
        server.wait_ready()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        assert {k: e["state"] for k, e in index(client).items()} == {(MODEL, "1"): "READY",
                                                                      (MODEL, "2"): "READY"}
        for version in ("1", "2"):
            logits, answered = triton_infer(client, version)
            assert answered == version
            np.testing.assert_allclose(logits, direct(repository / MODEL / version), rtol=1e-4, atol=1e-5)
        assert not np.allclose(direct(repository / MODEL / "1"), direct(repository / MODEL / "2"))
        assert triton_infer(client)[1] == "2"
        assert client.get_model_metadata(MODEL)["versions"] == ["1", "2"]
        with pytest.raises(InferenceServerException, match="no version '9'"):
            triton_infer(client, "9")


@pytest.mark.parametrize("damage, check", [(lambda b: b[: len(b) // 2], "size check"),
                                           (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "sha256 check")],
                         ids=["truncated", "changed"])
def test_a_broken_new_version_is_refused_with_the_reason_while_the_previous_keeps_serving(
        tmp_path, repository, damage, check):
    with serve(tmp_path, repository, MODEL_CONTROL_MODE="explicit") as server:
        server.wait_ready()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        folder = write_model_folder(repository, SMALL_CIFAR, seed=3, version=3)
        (folder / MODEL_FILE).write_bytes(damage((folder / MODEL_FILE).read_bytes()))
        with pytest.raises(InferenceServerException, match=check):
            client.load_model(MODEL)
        entries = index(client)
        assert entries[(MODEL, "3")]["state"] == "UNAVAILABLE" and check in entries[(MODEL, "3")]["reason"]
        assert entries[(MODEL, "2")]["state"] == "READY"
        assert triton_infer(client)[1] == "2"
        assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_unload_then_load_through_the_api_and_names_outside_the_repository_are_unknown(tmp_path, repository):
    with serve(tmp_path, repository, MODEL_CONTROL_MODE="explicit") as server:
        server.wait_ready()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        client.unload_model(MODEL)
        assert index(client)[(MODEL, "2")]["state"] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException, match="unloaded"):
            triton_infer(client)
        client.load_model(MODEL)
        assert triton_infer(client)[1] == "2"
        for name in ("..", "%2E%2E", "nope"):
            answer = httpx.post(f"{server.url}/v2/repository/models/{name}/load")
            assert answer.status_code == 404, answer.text
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric(metrics, "cnn_serve_model_unloads_total", model=MODEL, version="2") == 1
        assert metric(metrics, "cnn_serve_model_loads_total", model=MODEL, version="2", outcome="loaded") == 2


def test_a_model_known_but_not_loaded_is_not_ready_over_both_protocols_without_an_error(tmp_path):
    """Triton's answer to ModelReady: a model not loaded, an unknown model or version is simply not
    ready; tritonclient's is_model_ready returns False over HTTP and gRPC alike, never raises."""
    repository = tmp_path / "repository"
    other = dataclasses.replace(SMALL_CIFAR, name="small_other")
    write_model_folder(repository, SMALL_CIFAR, seed=1, version=1)
    write_model_folder(repository, other, seed=2)
    with serve(tmp_path, repository, MODEL_CONTROL_MODE="explicit", STARTUP_MODELS=MODEL) as server:
        server.wait_ready()
        http = triton.InferenceServerClient(server.url.removeprefix("http://"))
        grpc = triton_grpc.InferenceServerClient(server.grpc_address)

        def ready(name: str, version: str = "") -> tuple[bool, bool]:
            return http.is_model_ready(name, version), grpc.is_model_ready(name, version)

        assert ready(MODEL) == ready(MODEL, "1") == (True, True)
        assert ready(other.name) == (False, False)  # known to the repository, not loaded at start
        assert ready("nope") == ready(MODEL, "9") == (False, False)
        http.unload_model(MODEL)
        assert ready(MODEL) == ready(MODEL, "1") == (False, False)
        http.load_model(other.name)
        assert ready(other.name) == (True, True)
        grpc.close()


def test_the_default_mode_refuses_load_and_unload_and_changes_nothing(tmp_path, repository):
    with serve(tmp_path, repository, API_KEY=KEY) as server:
        server.wait_ready()
        url, key = server.url, {"X-API-Key": KEY}
        for action in ("load", "unload"):
            assert httpx.post(f"{url}/v2/repository/models/{MODEL}/{action}").status_code == 401
            answer = httpx.post(f"{url}/v2/repository/models/{MODEL}/{action}", headers=key)
            assert answer.status_code == 409 and answer.json()["code"] == "model_control_disabled"
        assert httpx.post(f"{url}/v2/repository/index").status_code == 401
        entries = httpx.post(f"{url}/v2/repository/index", headers=key).json()
        assert entries == [{"name": MODEL, "version": "2", "state": "READY", "reason": ""}]


def test_a_request_in_flight_during_a_swap_finishes_on_the_old_version(tmp_path):
    repository = tmp_path / "repository"
    write_model_folder(repository, SMALL_CIFAR, seed=1, version=1)
    with serve(tmp_path, repository, MODEL_CONTROL_MODE="explicit", PREPROCESS_WORKERS="1",
               INFERENCE_WORKERS="1") as server:
        server.wait_ready()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        png, slow = slow_png(), []

        def predict_slowly() -> None:  # about a second of PNG decoding on version 1
            answer = httpx.put(f"{server.url}/predict/{MODEL}", content=png, timeout=60)
            slow.append((answer, time.monotonic()))

        in_flight = threading.Thread(target=predict_slowly)
        in_flight.start()
        time.sleep(0.2)  # sent and decoding; that it is still in flight at the swap is checked below
        write_model_folder(repository, SMALL_CIFAR, seed=2, version=2)
        client.load_model(MODEL)
        swapped = time.monotonic()
        in_flight.join()
        logits, answered = triton_infer(client)
        entries = index(client)
    answer, finished = slow[0]
    assert finished > swapped, "the request was not in flight during the swap"
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == "1"
    assert answered == "2"
    np.testing.assert_allclose(logits, direct(repository / MODEL / "2"), rtol=1e-4, atol=1e-5)
    assert (MODEL, "1") not in entries and entries[(MODEL, "2")]["state"] == "READY"


def test_the_old_version_s_sessions_live_while_a_request_holds_them_and_are_freed_once_it_is_done(
        tmp_path):
    """In process: two requests admitted on version 1, one held on the only inference worker and
    one queued behind it, across an explicit-mode swap to version 2. Both answer from version 1;
    after, no reference to its sessions is left anywhere (weakrefs dead), nor its metric series."""
    repository = tmp_path / "repository"
    write_model_folder(repository, SMALL_CIFAR, seed=1, version=1)
    settings = Settings(model_repository=repository, model_control_mode="explicit", warmup_runs=1,
                        intra_op_threads=2, inference_workers=1)
    metrics = Metrics()
    engine = Engine(discover(repository), settings, on_load=metrics.observe_load,
                    on_unload=metrics.observe_unload, on_forget=metrics.forget_version)
    engine.load_all()
    old = engine.model(MODEL)
    alive = [weakref.ref(o) for o in (old, old.session, old.one_thread_session) if o is not None]
    gate = threading.Event()

    def held_batch() -> np.ndarray:  # made on the inference worker: in flight until the gate opens
        gate.wait(30)
        return tensor()

    async def swap_during_two_requests(old: ServedModel) -> list[np.ndarray]:
        try:
            async with engine.in_use(old):  # as Lifecycle.handle holds the model it admitted on
                running = asyncio.gather(engine.infer(old, held_batch), engine.infer(old, tensor()))
                write_model_folder(repository, SMALL_CIFAR, seed=2, version=2)
                await ModelControl(engine, settings).load(MODEL)
                assert engine.model(MODEL).version == "2" and list(engine.versions[MODEL]) == ["2"]
                assert all(ref() is not None for ref in alive), "freed while a request used them"
                gate.set()
                return [answer.outputs for answer in await running]
        finally:
            gate.set()

    for outputs in asyncio.run(swap_during_two_requests(old)):
        np.testing.assert_allclose(outputs, direct(repository / MODEL / "1"), rtol=1e-4, atol=1e-5)
    del old
    gc.collect()
    assert [ref() for ref in alive] == [None] * len(alive), "version 1's sessions are still referenced"
    exposition = metrics.prometheus_text().decode()
    assert 'cnn_serve_model_version_ready{model="small_cifar",version="2"} 1.0' in exposition
    assert 'cnn_serve_model_version_ready{model="small_cifar",version="1"}' not in exposition
    engine.close()


def copy_slowly(source: Path, target: Path, chunks: int = 8, pause: float = 0.05) -> float:
    """metadata.json first, then labels, then the model in chunks; the time of the last byte."""
    target.mkdir(parents=True)
    shutil.copy(source / METADATA_FILE, target / METADATA_FILE)
    shutil.copy(source / LABELS_FILE, target / LABELS_FILE)
    data = (source / MODEL_FILE).read_bytes()
    step = len(data) // chunks + 1
    with (target / MODEL_FILE).open("wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start:start + step])
            f.flush()
            time.sleep(pause)
    return time.monotonic()


def test_poll_mode_swaps_in_versions_copied_slowly_without_failing_a_request(tmp_path, repository, request):
    staging = tmp_path / "staging"
    for version in (3, 4, 5, 6):
        write_model_folder(staging, SMALL_CIFAR, seed=version, version=version)
    statuses: list[int] = []
    stop = threading.Event()

    def client_loop(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                "data": tensor().ravel().tolist()}]}
            while not stop.is_set():
                statuses.append(http.post(f"/v2/models/{MODEL}/infer", json=body).status_code)

    with serve(tmp_path, repository, MODEL_CONTROL_MODE="poll", REPOSITORY_POLL_SECONDS="0.2") as server:
        server.wait_ready()
        clients = [threading.Thread(target=client_loop, args=(server.url,)) for _ in range(16)]
        for thread in clients:
            thread.start()
        delays = []
        try:
            for version in ("3", "4", "5", "6"):
                last_byte = copy_slowly(staging / MODEL / version, repository / MODEL / version)
                while httpx.get(f"{server.url}/v2/models/{MODEL}").json()["versions"] != [version]:
                    assert time.monotonic() - last_byte < 30, "version never served"
                    time.sleep(0.02)
                delays.append(time.monotonic() - last_byte)
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        logits, answered = triton_infer(client)
    assert answered == "6"
    np.testing.assert_allclose(logits, direct(staging / MODEL / "6"), rtol=1e-4, atol=1e-5)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    print(f"\n{len(statuses)} answers, all 200; last byte to serving: "
          + ", ".join(f"{d * 1000:.0f} ms" for d in delays))


def test_at_most_two_models_loaded_and_one_load_for_a_burst_of_first_requests(tmp_path):
    repository = tmp_path / "repository"
    names = [f"small_{i}" for i in range(4)]
    for i, name in enumerate(names):
        write_model_folder(repository, dataclasses.replace(SMALL_CIFAR, name=name), seed=i)
    with serve(tmp_path, repository, MAX_LOADED_MODELS="2") as server:
        server.wait_ready()
        url = server.url
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                            "data": tensor().ravel().tolist()}]}
        for round_ in range(2):
            for name in names:
                answers: list[httpx.Response] = []
                burst = [threading.Thread(target=lambda n=name, answers=answers: answers.append(
                    httpx.post(f"{url}/v2/models/{n}/infer", json=body, timeout=60))) for _ in range(8)]
                for thread in burst:
                    thread.start()
                for thread in burst:
                    thread.join()
                assert [a.status_code for a in answers] == [200] * 8
                if round_ == 0 and name in names[2:]:  # not loaded at start: exactly one load
                    assert sum("load;dur=" in a.headers["server-timing"] for a in answers) >= 1
                ready = [e for e in httpx.post(f"{url}/v2/repository/index").json() if e["state"] == "READY"]
                assert len(ready) <= 2, ready
        metrics = httpx.get(f"{url}/metrics").text
    loads = {n: metric(metrics, "cnn_serve_model_loads_total", model=n, outcome="loaded") for n in names}
    # each round visits the four in turn with room for two: every visit after the first two loads once
    assert loads == {names[0]: 2, names[1]: 2, names[2]: 2, names[3]: 2}, loads

"""Dynamic batching: requests that queue for a busy model share one session.run, each caller still
gets exactly its own answer, and a request that finds the model idle never waits for company."""
import asyncio

import numpy as np
import pytest

from contract import Preprocessing, discover
from service import engine as engine_module
from service.engine import Engine, more_threads_win
from service.errors import InferenceFailed, UndecodableImage
from service.preprocess import preprocess
from service.settings import Settings

MODEL = "small_imagenet"  # what is tested is the batcher, not the network: a small 1000-class model


def engine_for(small_repository, trim=None, **settings) -> tuple[Engine, list[int]]:
    """An engine serving one model, recording the size of every session.run it makes."""
    sizes: list[int] = []
    folders = [f for f in discover(small_repository) if f.name == MODEL]
    engine = Engine(folders, Settings(model_repository=small_repository,
                                      **{"intra_op_threads": 1, "warmup_runs": 1, **settings}),
                    on_batch=lambda model, size: sizes.append(size), trim=trim)
    engine.load_all()
    sizes.clear()  # warm-up runs are not served requests
    return engine, sizes


@pytest.fixture(scope="module")
def photo_tensors(small_repository, photos) -> list[np.ndarray]:
    """One (1, 3, 224, 224) tensor per test photo, all different."""
    engine, _ = engine_for(small_repository)
    spec: Preprocessing = engine.model(MODEL).metadata.preprocessing
    return [preprocess(path.read_bytes(), spec, 10**9) for path in photos.values()]


def lone_run(engine: Engine, batch: np.ndarray) -> np.ndarray:
    return engine.model(MODEL).run(batch)


async def infer_all(engine: Engine, batches: list) -> list:
    return await asyncio.gather(*(engine.infer(engine.model(MODEL), b) for b in batches),
                                return_exceptions=True)


def test_concurrent_callers_share_a_batch_and_each_gets_its_own_answer(small_repository,
                                                                      photo_tensors):
    engine, sizes = engine_for(small_repository, inference_workers=1, max_batch_size=8)
    # Five photos one by one, then a two-image request (as the Open Inference Protocol sends).
    requests = [*photo_tensors, np.concatenate(photo_tensors[:2][::-1])]
    answers = asyncio.run(infer_all(engine, requests))
    assert sizes == [1, 6]  # the first found the model idle; the rest queued and ran together
    for request, answer in zip(requests, answers, strict=True):
        assert answer.outputs.shape == (request.shape[0], 1000)
        np.testing.assert_allclose(answer.outputs, lone_run(engine, request), rtol=1e-5, atol=1e-5)
    assert [a.batch_size for a in answers] == [1, 6, 6, 6, 6, 6]
    engine.close()


def test_a_request_finding_the_model_idle_does_not_wait_for_the_queue_delay(small_repository,
                                                                          photo_tensors):
    delay_ms = 2000.0
    engine, sizes = engine_for(small_repository, max_queue_delay_ms=delay_ms)
    for tensor in photo_tensors[:3]:
        answer = asyncio.run(engine.infer(engine.model(MODEL), tensor))
        assert answer.batch_size == 1
        assert answer.queue_ms < delay_ms / 20  # it ran at once, it did not sit out the delay
    assert sizes == [1, 1, 1]
    engine.close()


def test_queued_requests_wait_up_to_the_delay_to_fill_a_batch(small_repository, photo_tensors):
    delay_ms = 300.0
    engine, sizes = engine_for(small_repository, inference_workers=1, max_batch_size=8,
                               max_queue_delay_ms=delay_ms)

    async def scenario() -> list:
        first = asyncio.ensure_future(engine.infer(engine.model(MODEL), photo_tensors[0]))
        await asyncio.sleep(0)  # the first starts alone; the next one queues behind it
        second = asyncio.ensure_future(engine.infer(engine.model(MODEL), photo_tensors[1]))
        await asyncio.sleep(delay_ms / 1000 / 3)  # long after the first run ended
        third = asyncio.ensure_future(engine.infer(engine.model(MODEL), photo_tensors[2]))
        return await asyncio.gather(first, second, third)

    answers = asyncio.run(scenario())
    assert sizes == [1, 2]  # the second waited for the third instead of running alone
    assert answers[1].queue_ms >= delay_ms * 0.9
    for tensor, answer in zip(photo_tensors[:3], answers, strict=True):
        np.testing.assert_allclose(answer.outputs, lone_run(engine, tensor), rtol=1e-5, atol=1e-5)
    engine.close()


def test_with_batching_off_every_request_runs_alone(small_repository, photo_tensors):
    engine, sizes = engine_for(small_repository, inference_workers=1, max_batch_size=1)
    answers = asyncio.run(infer_all(engine, photo_tensors))
    assert sizes == [1] * len(photo_tensors)
    for tensor, answer in zip(photo_tensors, answers, strict=True):
        np.testing.assert_allclose(answer.outputs, lone_run(engine, tensor), rtol=1e-5, atol=1e-5)
    engine.close()


def test_a_malformed_tensor_queued_beside_good_ones_fails_alone(small_repository, photo_tensors):
    engine, sizes = engine_for(small_repository, inference_workers=1, max_batch_size=8)
    wrong = np.zeros((1, 3, 200, 200), np.float32)
    requests = [photo_tensors[0], photo_tensors[1], wrong, photo_tensors[2]]
    answers = asyncio.run(infer_all(engine, requests))
    assert isinstance(answers[2], InferenceFailed)
    for i in (0, 1, 3):
        np.testing.assert_allclose(answers[i].outputs, lone_run(engine, requests[i]),
                                   rtol=1e-5, atol=1e-5)
    assert sizes == [1, 2]  # the good ones queued together; the wrong shape ran (and failed) alone
    engine.close()


def test_a_lone_inference_gets_every_thread_and_one_started_beside_it_gets_one(small_repository,
                                                                               photo_tensors,
                                                                               monkeypatch):
    monkeypatch.setattr(Engine, "_more_threads_win", staticmethod(lambda model, x: True))
    engine, _sizes = engine_for(small_repository, intra_op_threads=2, inference_workers=2,
                               max_batch_size=1)
    assert engine.model(MODEL).one_thread_session is not None
    lone = asyncio.run(engine.infer(engine.model(MODEL), photo_tensors[0]))
    assert lone.threads == 2
    answers = asyncio.run(infer_all(engine, photo_tensors[:2]))
    assert [a.threads for a in answers] == [2, 1]  # the second started while the first ran
    for tensor, answer in zip(photo_tensors[:2], answers, strict=True):
        np.testing.assert_allclose(answer.outputs, lone_run(engine, tensor), rtol=1e-5, atol=1e-5)
    engine.close()


def test_a_model_that_more_threads_do_not_speed_up_keeps_one_thread_session(small_repository,
                                                                            photo_tensors,
                                                                            monkeypatch):
    monkeypatch.setattr(Engine, "_more_threads_win", staticmethod(lambda model, x: False))
    engine, _ = engine_for(small_repository, intra_op_threads=2, inference_workers=2)
    model = engine.model(MODEL)
    assert model.one_thread_session is None and model.threads == 1
    answers = asyncio.run(infer_all(engine, photo_tensors[:2]))
    assert [a.threads for a in answers] == [1, 1]
    engine.close()


def test_all_threads_serve_a_lone_request_only_when_at_least_10_percent_faster():
    # Medians measured at load, in ms: EffNet is slower on two threads, MobileNetV3 much faster.
    assert not more_threads_win(wide_ms=0.21, narrow_ms=0.16)
    assert more_threads_win(wide_ms=3.7, narrow_ms=5.3)
    assert not more_threads_win(wide_ms=0.95, narrow_ms=1.0)


def test_with_one_thread_or_one_worker_a_model_has_one_session(small_repository):
    for settings in ({"intra_op_threads": 1, "inference_workers": 2},
                     {"intra_op_threads": 2, "inference_workers": 1}):
        engine, _ = engine_for(small_repository, **settings)
        assert engine.model(MODEL).one_thread_session is None
        engine.close()


def test_the_heap_is_trimmed_once_no_inference_has_run_for_a_while(small_repository, photo_tensors,
                                                                   monkeypatch):
    trims = []
    monkeypatch.setattr(engine_module, "IDLE_TRIM_SECONDS", 0.6)
    engine, _ = engine_for(small_repository, trim=lambda: trims.append(0))

    async def scenario() -> None:
        await engine.infer(engine.model(MODEL), photo_tensors[0])
        await asyncio.sleep(0.1)
        await engine.infer(engine.model(MODEL), photo_tensors[1])  # busy again before the timer: no trim yet
        await asyncio.sleep(0.1)
        assert trims == []
        await asyncio.sleep(1.0)

    asyncio.run(scenario())
    assert trims == [0]
    engine.close()


def test_a_job_that_makes_its_own_batch_runs_alone_and_its_refusal_reaches_the_caller(
        small_repository, photo_tensors):
    engine, sizes = engine_for(small_repository, inference_workers=1, max_batch_size=8)

    def undecodable() -> np.ndarray:
        raise UndecodableImage("not an image")

    jobs = [photo_tensors[0], lambda: photo_tensors[1], undecodable, photo_tensors[2], photo_tensors[3]]
    answers = asyncio.run(infer_all(engine, jobs))
    assert isinstance(answers[2], UndecodableImage)  # the client's error, not an inference failure
    for i, tensor in ((0, photo_tensors[0]), (1, photo_tensors[1]), (3, photo_tensors[2])):
        np.testing.assert_allclose(answers[i].outputs, lone_run(engine, tensor), rtol=1e-5, atol=1e-5)
    assert sizes == [1, 1, 2]  # the job ran alone; the two arrays queued behind it ran together
    engine.close()


def test_a_queued_request_whose_caller_has_gone_is_never_run(small_repository, photo_tensors):
    engine, sizes = engine_for(small_repository, inference_workers=1, max_batch_size=1)

    async def scenario() -> None:
        model = engine.model(MODEL)
        first = asyncio.ensure_future(engine.infer(model, photo_tensors[0]))
        await asyncio.sleep(0)  # the first runs; the next two queue behind it
        gone = asyncio.ensure_future(engine.infer(model, photo_tensors[1]))
        kept = asyncio.ensure_future(engine.infer(model, photo_tensors[2]))
        await asyncio.sleep(0)
        gone.cancel()  # as a request's deadline does
        await asyncio.gather(first, kept)

    asyncio.run(scenario())
    assert sizes == [1, 1]
    engine.close()

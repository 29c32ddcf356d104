"""The dynamic batcher on its own (no gRPC): batch forming, splitting, queue bound, cancel, failure."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from client.types import EnhanceOptions, FaceStatus
from server.batcher import Batcher, NotAccepting, PipelineFailed, QueueFull
from tests.fakes import FakePipeline, fake_enhanced, random_faces
from tests.helpers import until

pytestmark = pytest.mark.timeout(30)
OPTIONS = EnhanceOptions(output_size=256)




@pytest.fixture
def rng():
    return np.random.default_rng(7)


async def _batcher(pipeline, max_batch_faces=4, max_delay_ms=1.0, max_queue_faces=64):
    batcher = Batcher(pipeline, max_batch_faces, max_delay_ms, max_queue_faces)
    batcher.start()
    return batcher


async def test_a_request_larger_than_a_batch_is_split_and_comes_back_whole_in_order(rng):
    pipeline = FakePipeline()
    batcher = await _batcher(pipeline, max_batch_faces=4)
    faces = random_faces(rng, 10)
    faces[6] = 0  # one "no face" in the middle: its status must stay at index 6

    result = await batcher.submit(faces, OPTIONS)

    expected, status = fake_enhanced(faces, OPTIONS)
    assert pipeline.batch_sizes == [4, 4, 2]
    np.testing.assert_array_equal(result.faces, expected)
    assert result.status == status
    assert result.status[6] is FaceStatus.NO_FACE and result.status.count(FaceStatus.ENHANCED) == 9
    await batcher.close()


async def test_concurrent_requests_are_combined_up_to_max_batch_faces(rng):
    pipeline = FakePipeline()
    # A long max delay: the batch goes as soon as it is full, not when the delay runs out.
    batcher = await _batcher(pipeline, max_batch_faces=8, max_delay_ms=10_000)
    # 16 faces: the third request straddles the two batches.
    requests = [random_faces(rng, n) for n in (3, 3, 3, 3, 2, 2)]

    results = await asyncio.gather(*(batcher.submit(faces, OPTIONS) for faces in requests))

    assert pipeline.batch_sizes == [8, 8]
    assert [n for n, _ in pipeline.batches[0]] == [3, 3, 2]
    assert [n for n, _ in pipeline.batches[1]] == [1, 3, 2, 2]
    for faces, result in zip(requests, results):
        np.testing.assert_array_equal(result.faces, fake_enhanced(faces, OPTIONS)[0])
    await batcher.close()


async def test_a_lone_request_goes_after_max_delay_without_a_full_batch(rng):
    pipeline = FakePipeline()
    batcher = await _batcher(pipeline, max_batch_faces=32, max_delay_ms=2.0)
    faces = random_faces(rng, 3)
    result = await batcher.submit(faces, OPTIONS)
    assert pipeline.batch_sizes == [3]
    np.testing.assert_array_equal(result.faces, fake_enhanced(faces, OPTIONS)[0])
    await batcher.close()


async def test_requests_with_different_options_share_a_batch_and_keep_their_own_options(rng):
    pipeline = FakePipeline()
    batcher = await _batcher(pipeline, max_batch_faces=8, max_delay_ms=10_000)
    small = EnhanceOptions(output_size=256)
    large = EnhanceOptions(output_size=512, fidelity=0.5)
    a, b = random_faces(rng, 4), random_faces(rng, 4)

    result_a, result_b = await asyncio.gather(batcher.submit(a, small), batcher.submit(b, large))

    assert pipeline.batch_sizes == [8]
    assert [options for _, options in pipeline.batches[0]] == [small, large]
    assert result_a.faces.shape == (4, 256, 256, 3) and result_b.faces.shape == (4, 512, 512, 3)
    np.testing.assert_array_equal(result_b.faces, fake_enhanced(b, large)[0])
    await batcher.close()


async def test_device_work_runs_on_one_worker_thread_and_the_loop_stays_free(rng):
    hold = threading.Event()
    pipeline = FakePipeline(hold=hold)
    batcher = await _batcher(pipeline)
    task = asyncio.ensure_future(batcher.submit(random_faces(rng, 2), OPTIONS))
    await until(pipeline.started.is_set)

    # The batch is stuck on the "device", yet the loop keeps running other coroutines.
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0.001)
        ticks += 1
    assert ticks == 5 and not task.done()

    hold.set()
    result = await task
    assert result.faces.shape == (2, 256, 256, 3)
    assert len(pipeline.threads) == 1
    assert next(iter(pipeline.threads)).startswith("faceenhance-device")
    assert threading.current_thread().name not in pipeline.threads
    await batcher.close()


async def test_a_full_queue_refuses_at_once_and_recovers_when_it_empties(rng):
    hold = threading.Event()
    pipeline = FakePipeline(hold=hold)
    batcher = await _batcher(pipeline, max_batch_faces=4, max_queue_faces=8)
    on_device = asyncio.ensure_future(batcher.submit(random_faces(rng, 4), OPTIONS))
    await until(pipeline.started.is_set)
    queued = asyncio.ensure_future(batcher.submit(random_faces(rng, 8), OPTIONS))
    await until(lambda: batcher.queued_faces == 8)

    with pytest.raises(QueueFull) as refused:
        await batcher.submit(random_faces(rng, 1), OPTIONS)
    message = str(refused.value)
    assert "queue is full" in message and "8 faces are waiting" in message and "retry" in message
    assert batcher.queued_faces == 8  # the refused request left nothing behind

    hold.set()
    assert (await on_device).faces.shape[0] == 4
    assert (await queued).faces.shape[0] == 8
    again = random_faces(rng, 1)
    result = await batcher.submit(again, OPTIONS)
    np.testing.assert_array_equal(result.faces, fake_enhanced(again, OPTIONS)[0])
    await batcher.close()


async def test_a_cancelled_request_is_dropped_from_the_queue_and_never_computed(rng):
    hold = threading.Event()
    pipeline = FakePipeline(hold=hold)
    batcher = await _batcher(pipeline, max_batch_faces=4)
    first = asyncio.ensure_future(batcher.submit(random_faces(rng, 4), OPTIONS))
    await until(pipeline.started.is_set)
    unwanted = np.full((6, 64, 64, 3), 77, np.uint8)
    cancelled = asyncio.ensure_future(batcher.submit(unwanted, OPTIONS))
    await until(lambda: batcher.queued_faces == 6)

    cancelled.cancel()
    await until(lambda: batcher.queued_faces == 0)
    hold.set()
    await first
    later = random_faces(rng, 2)
    await batcher.submit(later, OPTIONS)

    assert pipeline.batch_sizes == [4, 2]
    assert not any((face == 77).all() for face in pipeline.faces_seen)
    await batcher.close()


async def test_a_request_cancelled_between_its_chunks_drops_the_rest(rng):
    hold = threading.Event()
    pipeline = FakePipeline(hold=hold)
    batcher = await _batcher(pipeline, max_batch_faces=4)
    big = asyncio.ensure_future(batcher.submit(random_faces(rng, 12), OPTIONS))
    await until(lambda: pipeline.started.is_set() and batcher.queued_faces == 8)

    big.cancel()
    await until(lambda: batcher.queued_faces == 0)
    hold.set()
    with pytest.raises(asyncio.CancelledError):
        await big
    survivor = random_faces(rng, 1)
    result = await batcher.submit(survivor, OPTIONS)

    assert pipeline.batch_sizes == [4, 1]  # the 8 faces behind the first chunk never ran
    np.testing.assert_array_equal(result.faces, fake_enhanced(survivor, OPTIONS)[0])
    await batcher.close()


async def test_a_failing_batch_fails_only_its_requests_and_the_batcher_keeps_going(rng):
    poisoned = EnhanceOptions(output_size=256, fidelity=0.25)
    pipeline = FakePipeline(fail_if=lambda jobs: any(job.options == poisoned for job in jobs))
    batcher = await _batcher(pipeline, max_batch_faces=4)

    with pytest.raises(PipelineFailed) as failed:
        await batcher.submit(random_faces(rng, 2), poisoned)
    assert "fake device failure" in str(failed.value)

    healthy = random_faces(rng, 3)
    result = await batcher.submit(healthy, OPTIONS)
    np.testing.assert_array_equal(result.faces, fake_enhanced(healthy, OPTIONS)[0])
    assert batcher.queued_faces == 0
    await batcher.close()


async def test_a_failure_in_one_chunk_fails_the_whole_split_request_and_drops_its_other_chunks(rng):
    calls = []
    pipeline = FakePipeline(fail_if=lambda jobs: calls.append(1) or len(calls) == 1)
    batcher = await _batcher(pipeline, max_batch_faces=4)
    with pytest.raises(PipelineFailed):
        await batcher.submit(random_faces(rng, 12), OPTIONS)
    await until(lambda: batcher.queued_faces == 0)
    assert pipeline.batch_sizes == [4]  # the two chunks behind the failed one were dropped
    await batcher.close()


async def test_results_report_queue_and_compute_time_of_every_chunk(rng):
    pipeline = FakePipeline(delay_s=0.05)
    batcher = await _batcher(pipeline, max_batch_faces=4)
    result = await batcher.submit(random_faces(rng, 8), OPTIONS)  # two batches of 50 ms
    assert result.compute_ms >= 100.0
    assert result.queue_ms >= 50.0  # its last chunk waited for the first one
    await batcher.close()


async def test_drain_finishes_accepted_work_and_refuses_new_work(rng):
    pipeline = FakePipeline(delay_s=0.02)
    batcher = await _batcher(pipeline, max_batch_faces=2)
    accepted = [asyncio.ensure_future(batcher.submit(random_faces(rng, 2), OPTIONS))
                for _ in range(3)]
    await asyncio.sleep(0)
    drained = asyncio.ensure_future(batcher.drain(timeout=10))
    await asyncio.sleep(0)
    with pytest.raises(NotAccepting):
        await batcher.submit(random_faces(rng, 1), OPTIONS)

    assert await drained is True
    assert all(task.done() and task.result().faces.shape == (2, 256, 256, 3) for task in accepted)
    assert pipeline.faces_total == 6
    await batcher.close()


async def test_drain_that_runs_out_of_time_fails_what_is_still_queued(rng):
    hold = threading.Event()
    pipeline = FakePipeline(hold=hold)
    batcher = await _batcher(pipeline, max_batch_faces=2)
    first = asyncio.ensure_future(batcher.submit(random_faces(rng, 2), OPTIONS))
    await until(pipeline.started.is_set)
    waiting = asyncio.ensure_future(batcher.submit(random_faces(rng, 2), OPTIONS))
    await until(lambda: batcher.queued_faces == 2)

    assert await batcher.drain(timeout=0.05) is False
    with pytest.raises(NotAccepting):
        await waiting
    hold.set()
    assert (await first).faces.shape[0] == 2  # work already on the device still finishes
    await batcher.close()

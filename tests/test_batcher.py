"""The dynamic batcher on its own (no gRPC): batch forming, splitting, queue bound, cancel, failure."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from contract.types import EnhanceOptions, FaceStatus
from server.batcher import Batcher, NotAccepting, PipelineFailed, QueueFull
from tests.fakes import FakePipeline, QueuedFakePipeline, fake_enhanced, random_faces
from tests.helpers import until

pytestmark = pytest.mark.timeout(30)
OPTIONS = EnhanceOptions(output_size=256)




@pytest.fixture
def rng():
    return np.random.default_rng(7)


async def _batcher(pipeline, max_batch_faces=4, max_delay_ms=1.0, max_queue_faces=64, overlap=False):
    batcher = Batcher(pipeline, max_batch_faces, max_delay_ms, max_queue_faces, overlap=overlap)
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


# --- overlap: the next batch queued on the device while the last one computes -----------------

def _starts(pipeline: QueuedFakePipeline) -> list[int]:
    return [n for what, n in pipeline.events if what == "start"]


async def test_with_overlap_a_full_batch_is_queued_while_the_one_before_computes(rng):
    pipeline = QueuedFakePipeline(gated=True)
    batcher = await _batcher(pipeline, max_batch_faces=4, max_delay_ms=10_000, overlap=True)
    requests = [random_faces(rng, 4) for _ in range(3)]
    answers = [asyncio.ensure_future(batcher.submit(faces, OPTIONS)) for faces in requests]

    # batch 1 is queued behind batch 0, which the device has not finished
    await until(lambda: _starts(pipeline) == [0, 1])
    await asyncio.sleep(0.05)
    assert _starts(pipeline) == [0, 1]  # never more than two batches on the device
    assert not any(answer.done() for answer in answers)

    pipeline.release(0)
    await until(lambda: answers[0].done() and _starts(pipeline) == [0, 1, 2])
    assert not answers[1].done()
    pipeline.release(1)
    pipeline.release(2)
    results = await asyncio.gather(*answers)

    for faces, result in zip(requests, results):
        np.testing.assert_array_equal(result.faces, fake_enhanced(faces, OPTIONS)[0])
    # batch 2 waited for batch 0's results; results were read in the order batches were queued
    events = pipeline.events
    assert events.index(("result", 0)) < events.index(("start", 2))
    assert [n for what, n in events if what == "result"] == [0, 1, 2]
    assert pipeline.batch_sizes == [4, 4, 4]
    await batcher.close()


async def test_without_overlap_the_next_batch_is_queued_only_after_the_last_one_is_answered(rng):
    pipeline = QueuedFakePipeline(gated=True)
    batcher = await _batcher(pipeline, max_batch_faces=4, max_delay_ms=10_000, overlap=False)
    answers = [asyncio.ensure_future(batcher.submit(random_faces(rng, 4), OPTIONS)) for _ in range(2)]
    await until(lambda: _starts(pipeline) == [0])
    await asyncio.sleep(0.05)
    assert _starts(pipeline) == [0]  # a full batch waits, the device holds one

    pipeline.release(0)
    pipeline.release(1)
    await asyncio.gather(*answers)
    assert pipeline.events == [("start", 0), ("done", 0), ("result", 0), ("start", 1), ("done", 1), ("result", 1)]
    await batcher.close()


async def test_with_overlap_a_batch_that_is_not_full_waits_for_the_device_and_so_is_never_smaller(rng):
    pipeline = QueuedFakePipeline(gated=True)
    batcher = await _batcher(pipeline, max_batch_faces=4, max_delay_ms=1.0, overlap=True)
    first = asyncio.ensure_future(batcher.submit(random_faces(rng, 4), OPTIONS))
    await until(lambda: _starts(pipeline) == [0])
    second = asyncio.ensure_future(batcher.submit(random_faces(rng, 2), OPTIONS))
    await asyncio.sleep(0.05)  # far past max_delay_ms: still no second batch while the first computes
    assert _starts(pipeline) == [0]

    third = asyncio.ensure_future(batcher.submit(random_faces(rng, 2), OPTIONS))
    await until(lambda: _starts(pipeline) == [0, 1])  # now the queue holds a full batch: it goes
    assert pipeline.batch_sizes == [4, 4]

    fourth = asyncio.ensure_future(batcher.submit(random_faces(rng, 1), OPTIONS))
    pipeline.release(0)
    await until(first.done)
    await asyncio.sleep(0.05)  # one batch on the device again: the lone face still waits for it
    assert _starts(pipeline) == [0, 1]
    pipeline.release(1)
    pipeline.release(2)
    await asyncio.gather(second, third, fourth)
    assert pipeline.batch_sizes == [4, 4, 1]  # and then goes as it would without overlap
    await batcher.close()


async def test_with_overlap_a_failed_wait_fails_only_its_batch(rng):
    pipeline = QueuedFakePipeline(gated=True, fail_result_if=lambda n: n == 0)
    batcher = await _batcher(pipeline, max_batch_faces=4, max_delay_ms=10_000, overlap=True)
    doomed = asyncio.ensure_future(batcher.submit(random_faces(rng, 4), OPTIONS))
    faces = random_faces(rng, 4)
    fine = asyncio.ensure_future(batcher.submit(faces, OPTIONS))
    await until(lambda: _starts(pipeline) == [0, 1])
    pipeline.release(0)
    pipeline.release(1)

    with pytest.raises(PipelineFailed, match="fake device failure seen at the wait"):
        await doomed
    np.testing.assert_array_equal((await fine).faces, fake_enhanced(faces, OPTIONS)[0])
    await batcher.close()


async def test_with_overlap_a_batch_that_runs_out_of_memory_behind_another_runs_again_smaller(rng):
    pipeline = QueuedFakePipeline(out_of_memory_above=2, delay_s=0.01)
    batcher = await _batcher(pipeline, max_batch_faces=4, max_delay_ms=10_000, overlap=True)
    requests = [random_faces(rng, 3) for _ in range(4)]
    results = await asyncio.gather(*(batcher.submit(faces, OPTIONS) for faces in requests))

    for faces, result in zip(requests, results):
        np.testing.assert_array_equal(result.faces, fake_enhanced(faces, OPTIONS)[0])
    sizes = pipeline.batch_sizes
    assert sizes[0] == 4 and max(sizes[1:]) == 2 and sum(sizes) == 12 + 4  # the refused 4, again
    assert batcher.batch_ceiling == 2
    await batcher.close()


async def test_with_overlap_device_time_is_not_counted_twice(rng):
    """A batch queued behind another counts from when the device finished that one."""
    pipeline = QueuedFakePipeline(gated=True)
    batcher = await _batcher(pipeline, max_batch_faces=4, max_delay_ms=10_000, overlap=True)
    first = asyncio.ensure_future(batcher.submit(random_faces(rng, 4), OPTIONS))
    second = asyncio.ensure_future(batcher.submit(random_faces(rng, 4), OPTIONS))
    await until(lambda: _starts(pipeline) == [0, 1])
    await asyncio.sleep(0.4)
    pipeline.release(0)
    await first
    await asyncio.sleep(0.4)
    pipeline.release(1)
    late = await second

    # queued at once, on the device from batch 0's end (0.4 s in) to its own (0.8 s in)
    assert 300 < late.queue_ms < 700 and 300 < late.compute_ms < 700, (late.queue_ms, late.compute_ms)
    await batcher.close()


async def _two_batches_on_the_device(rng):
    """An overlapping batcher over a gated queued fake, three requests of a batch each accepted,
    the first two queued on the device and held there: (pipeline, batcher, the three submits)."""
    pipeline = QueuedFakePipeline(gated=True)
    batcher = await _batcher(pipeline, max_batch_faces=2, max_delay_ms=10_000, overlap=True)
    accepted = [asyncio.ensure_future(batcher.submit(random_faces(rng, 2), OPTIONS)) for _ in range(3)]
    await until(lambda: _starts(pipeline) == [0, 1])
    return pipeline, batcher, accepted


async def test_with_overlap_drain_finishes_both_batches_on_the_device(rng):
    pipeline, batcher, accepted = await _two_batches_on_the_device(rng)
    drained = asyncio.ensure_future(batcher.drain(timeout=10))
    await asyncio.sleep(0.02)
    assert not drained.done()
    for number in range(3):
        pipeline.release(number)
    assert await drained is True
    assert all(task.result().faces.shape == (2, 256, 256, 3) for task in accepted)
    await batcher.close()


async def test_with_overlap_abandon_fails_both_batches_on_the_device_at_once(rng):
    pipeline, batcher, accepted = await _two_batches_on_the_device(rng)
    batcher.abandon()
    for task in accepted:
        with pytest.raises(NotAccepting):
            await task
    for number in range(3):
        pipeline.release(number)
    await batcher.close()

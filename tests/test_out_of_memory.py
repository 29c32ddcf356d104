"""A batch the device has no memory for: its faces run again in smaller batches, none is lost.

On a GPU shared with the program it serves (MuseTalk beside the service on one card), or a
--max-batch-faces set too high, a device batch can run out of memory. The pipeline then puts
everything back as it was (steady video's filters, the allocator's cache) and raises
DeviceOutOfMemory; the batcher puts the batch's faces back at the head of the queue and halves
its ceiling; a single face that does not fit fails RESOURCE_EXHAUSTED, and the client falls back.
Here: the batcher and the service over a fake device that runs out above a size; the real
pipeline with a real failed allocation inside its GFPGAN pass; the real pipeline and batcher in
a process whose address space is capped (tests/capped_memory.py); gfpgan-bench's memory step.
On a GPU (the GPU check's tests step), a batch past a cap on CUDA's caching allocator.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import Alignment, EnhanceOptions, FaceStatus
from server.batcher import Batcher, DeadlineExceeded, DeviceFull
from server.jobs import DeviceOutOfMemory, Job, JobResult, ModelInfo
from server.metrics import Metrics
from server.pipeline import ModelRouter, enhance_within_memory, is_out_of_memory
from server.steady import VideoState
from tests.device import TEST_DEVICE
from tests.faces import make_faces
from tests.fakes import FakePipeline, fake_enhanced, random_faces
from tests.helpers import enhance_through_batcher, until
from tests.service_process import ROOT
from tests.test_server import RESOURCE_EXHAUSTED, assert_answers, channel, request, running
from tests.test_steady import jittered_video, pipeline  # noqa: F401 - the box-mask pipeline fixture

OPTIONS = EnhanceOptions(output_size=256)


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def filter_state(video: VideoState) -> dict:
    return {name: value.tolist() if isinstance(value, np.ndarray) else value
            for name, value in vars(video).items()}


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def started(fake: FakePipeline, max_batch_faces: int, max_delay_ms: float = 1.0,
            **kwargs) -> tuple[Batcher, Metrics]:
    """A started Batcher over `fake` with metrics of its own (64 faces of queue)."""
    metrics = Metrics()
    batcher = Batcher(fake, max_batch_faces=max_batch_faces, max_delay_ms=max_delay_ms, max_queue_faces=64,
                      metrics=metrics, **kwargs)
    batcher.start()
    return batcher, metrics


# --- the batcher ---------------------------------------------------------------------------------

@pytest.mark.timeout(30)
async def test_a_batch_the_device_has_no_memory_for_runs_again_in_halves_and_every_face_comes_back(rng):
    fake = FakePipeline(out_of_memory_above=3)
    batcher, metrics = started(fake, max_batch_faces=8, max_delay_ms=10_000)
    requests = [random_faces(rng, n) for n in (5, 3, 4)]  # three callers

    results = await asyncio.gather(*(batcher.submit(faces, OPTIONS) for faces in requests))

    for faces, result in zip(requests, results):
        expected, status = fake_enhanced(faces, OPTIONS)
        np.testing.assert_array_equal(result.faces, expected)
        assert result.status == status and set(status) == {FaceStatus.ENHANCED}
    # 8 ran out, its faces went back first in the queue; 4 ran out; then 2 at a time, in order
    assert fake.batch_sizes == [8, 4, 2, 2, 2, 2, 2, 2]
    assert [[n for n, _ in batch] for batch in fake.batches[2:]] == [[2], [2], [1, 1], [2], [2], [2]]
    assert batcher.batch_ceiling == 2 and batcher.queued_faces == 0
    assert sample(metrics, "faceenhance_device_out_of_memory_total") == 2
    assert sample(metrics, "faceenhance_batch_ceiling_faces") == 2
    await batcher.close()


@pytest.mark.timeout(30)
async def test_one_face_the_device_has_no_memory_for_fails_its_request_alone_and_the_batcher_goes_on(rng):
    fake = FakePipeline(out_of_memory_above=0)
    batcher, metrics = started(fake, max_batch_faces=4)
    with pytest.raises(DeviceFull, match="no memory for even one face"):
        await batcher.submit(random_faces(rng, 1), OPTIONS)
    assert fake.batch_sizes == [1] and batcher.batch_ceiling == 1

    fake.out_of_memory_above = None  # the memory is back
    faces = random_faces(rng, 3)
    result = await batcher.submit(faces, OPTIONS)
    np.testing.assert_array_equal(result.faces, fake_enhanced(faces, OPTIONS)[0])
    assert fake.batch_sizes == [1, 1, 1, 1]  # at the ceiling of 1 until recover_s passes
    assert sample(metrics, "faceenhance_device_out_of_memory_total") == 1
    await batcher.close()


@pytest.mark.timeout(30)
async def test_the_ceiling_doubles_back_to_max_batch_faces_after_recover_s_without_running_out(rng):
    fake = FakePipeline(out_of_memory_above=2)
    batcher, metrics = started(fake, max_batch_faces=8, recover_s=1.0)
    await batcher.submit(random_faces(rng, 8), OPTIONS)
    assert fake.batch_sizes == [8, 4, 2, 2, 2, 2] and batcher.batch_ceiling == 2

    fake.out_of_memory_above = None
    await asyncio.sleep(1.1)
    await batcher.submit(random_faces(rng, 8), OPTIONS)  # doubled once: 4, and not again so soon
    assert fake.batch_sizes[6:] == [4, 4]
    assert sample(metrics, "faceenhance_batch_ceiling_faces") == 4
    await asyncio.sleep(1.1)
    await batcher.submit(random_faces(rng, 8), OPTIONS)
    assert fake.batch_sizes[8:] == [8] and batcher.batch_ceiling == 8
    assert sample(metrics, "faceenhance_batch_ceiling_faces") == 8
    await batcher.close()


@pytest.mark.timeout(30)
async def test_a_request_cancelled_or_past_its_deadline_while_its_batch_ran_out_is_not_run_again(rng):
    hold = threading.Event()
    fake = FakePipeline(hold=hold, out_of_memory_above=1)
    batcher, _ = started(fake, max_batch_faces=8)
    cancelled = asyncio.ensure_future(batcher.submit(random_faces(rng, 1), OPTIONS))
    late = asyncio.ensure_future(batcher.submit(random_faces(rng, 1), OPTIONS,
                                                deadline=time.monotonic() + 0.2))
    await until(fake.started.is_set)
    cancelled.cancel()
    await asyncio.sleep(0.3)  # the late one's deadline passes while its batch is on the device
    hold.set()
    with pytest.raises(DeadlineExceeded):
        await late
    assert cancelled.cancelled()
    assert fake.batch_sizes == [2]  # neither ran again
    assert batcher.queued_faces == 0
    await batcher.close()


# --- the fake --------------------------------------------------------------------------------

def test_what_counts_as_running_out_of_memory():
    with pytest.raises(RuntimeError) as host:  # a real failed allocation, the CPU's allocator's words
        torch.empty(1 << 60, dtype=torch.uint8)
    assert is_out_of_memory(host.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(DeviceOutOfMemory("the device ran out of memory on a batch of 3 faces"))
    assert not is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid for input of size 5"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))  # only the allocators' RuntimeErrors


def test_a_pass_that_runs_out_of_memory_leaves_nothing_changed_and_runs_again_to_the_same_faces(
        pipeline, monkeypatch):  # noqa: F811
    faces, points = jittered_video(4, seed=5)
    steady = EnhanceOptions(alignment=Alignment.LANDMARKS, steady_video=True)

    def frames(video, start):
        return [Job(faces[start:start + 2], steady, points[start:start + 2], video=video)]

    reference = VideoState()
    pipeline.enhance(frames(reference, 0))
    [expected] = pipeline.enhance(frames(reference, 2))

    video = VideoState()
    pipeline.enhance(frames(video, 0))
    before = video.snapshot()
    restore, calls = pipeline._restore, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # a real allocation the device cannot make, inside the GFPGAN pass
            torch.empty(1 << 60, dtype=torch.uint8, device=TEST_DEVICE)
        return restore(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_restore", out_of_memory_once)
    with pytest.raises(DeviceOutOfMemory, match="ran out of memory on a batch of 2 faces") as failed:
        pipeline.enhance(frames(video, 2))
    assert "allocate" in failed.value.detail
    # the filter had moved two frames on before the GFPGAN pass: it is back where it was
    assert filter_state(video) == filter_state(before)

    [again] = pipeline.enhance(frames(video, 2))
    np.testing.assert_array_equal(again.faces, expected.faces)
    assert again.status == expected.status
    assert video.frame == reference.frame == 4 and np.array_equal(video.points, reference.points)


def test_a_restored_filter_keeps_what_the_service_reported_meanwhile():
    video = VideoState()
    for _ in range(3):
        video.smooth(np.array([[10, 10], [40, 10], [25, 25], [15, 40], [35, 40]], np.float64))
    before = video.snapshot()
    video.skip()
    video.reused, video.reported = 5, 5  # the service counted 5 reused frames while the batch ran
    video.restore(before)
    assert (video.frame, video.held, video.reused, video.reported) == (3, True, 0, 5)


def test_an_error_that_is_not_memory_goes_up_unchanged():
    video = VideoState()
    job = Job(np.zeros((1, 64, 64, 3), np.uint8), EnhanceOptions(steady_video=True), video=video)

    def broken() -> list[JobResult]:
        video.smooth(np.array([[10, 10], [40, 10], [25, 25], [15, 40], [35, 40]], np.float64))
        raise RuntimeError("an index out of range")

    with pytest.raises(RuntimeError, match="an index out of range"):
        enhance_within_memory(broken, [job], torch.device("cpu"))
    assert video.frame == 1  # not memory: nothing is put back, the batch fails as any failure


class _OneModel:
    """A restorer's pipeline for ModelRouter: moves its jobs' filters, then runs or runs out."""

    device = torch.device("cpu")

    def __init__(self, runs_out: bool):
        self.runs_out = runs_out

    def enhance(self, jobs):
        for job in jobs:
            for _ in range(job.faces.shape[0]):
                job.video.skip()
        if self.runs_out:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return [JobResult(np.zeros((job.faces.shape[0], 256, 256, 3), np.uint8),
                          [FaceStatus.ENHANCED] * job.faces.shape[0]) for job in jobs]


def test_a_model_that_runs_out_undoes_the_passes_of_the_models_before_it_in_the_batch():
    router = ModelRouter({"a": _OneModel(runs_out=False), "b": _OneModel(runs_out=True)},
                         ModelInfo("", "", "", "cpu", "float32", default_model="a"))
    first, second = VideoState(), VideoState()
    jobs = [Job(np.zeros((2, 64, 64, 3), np.uint8), EnhanceOptions(steady_video=True), video=first),
            Job(np.zeros((3, 64, 64, 3), np.uint8), EnhanceOptions(steady_video=True, model="b"), video=second)]
    with pytest.raises(DeviceOutOfMemory, match="batch of 5 faces") as failed:
        router.enhance(jobs)
    assert failed.value.detail.startswith("OutOfMemoryError: CUDA out of memory")
    assert first.frame == second.frame == 0  # model a's pass ran, and is undone with b's


# --- the service ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
async def test_the_service_answers_every_face_when_the_device_runs_out_and_refuses_one_that_never_fits(rng):
    fake = FakePipeline(out_of_memory_above=2)
    async with running(fake, max_batch_faces=4, max_delay_ms=200) as app:
        mine, theirs = random_faces(rng, 2), random_faces(rng, 2)

        async def one_client(request_id, faces):
            async with channel(app) as ch:
                return await pb_grpc.FaceEnhancerStub(ch).Enhance(request(request_id, faces))

        answers = await asyncio.gather(one_client(1, mine), one_client(2, theirs))
        assert_answers(answers[0], 1, mine)
        assert_answers(answers[1], 2, theirs)
        assert fake.batch_sizes[0] == 4 and max(fake.batch_sizes[1:]) == 2

        fake.out_of_memory_above = 0  # now not even one face fits
        async with channel(app) as ch:
            stream = pb_grpc.FaceEnhancerStub(ch).EnhanceBatch()
            await stream.write(request(3, random_faces(rng, 1)))
            refused = await asyncio.wait_for(stream.read(), 10)
            fake.out_of_memory_above = None
            again = random_faces(rng, 1)
            await stream.write(request(4, again))  # the stream, and the service, go on
            answered = await asyncio.wait_for(stream.read(), 10)
            await stream.done_writing()
        registry = app.metrics.registry
        ran_out = registry.get_sample_value("faceenhance_device_out_of_memory_total")
        ceiling = registry.get_sample_value("faceenhance_batch_ceiling_faces")
        refusals = registry.get_sample_value("faceenhance_requests_total",
                                             {"rpc": "EnhanceBatch", "outcome": "resource_exhausted"})
    assert (refused.request_id, refused.error.code) == (3, RESOURCE_EXHAUSTED)
    assert "no memory for even one face" in refused.error.message
    assert not refused.faces.data  # nothing comes back as if enhanced
    assert_answers(answered, 4, again)
    assert (ran_out, ceiling, refusals) == (2, 1, 1)


@pytest.mark.timeout(60)
async def test_the_client_falls_back_and_marks_the_face_when_the_service_has_no_memory_for_it(rng):
    from client.aio import AsyncFaceEnhanceClient

    fake = FakePipeline(out_of_memory_above=0)
    async with running(fake) as app:
        async with AsyncFaceEnhanceClient(f"127.0.0.1:{app.port}", options=OPTIONS, timeout_ms=10_000) as client:
            outcome = await client.enhance(random_faces(rng, 1))
    assert outcome.fell_back and outcome.fallback_reason == "resource_exhausted"
    assert outcome.status == [FaceStatus.FALLBACK]


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux") or TEST_DEVICE.type != "cpu",
                    reason="the CPU allocator, its address space capped with RLIMIT_AS (Linux); on a GPU, "
                           "the CUDA test below")
def test_a_batch_that_runs_out_of_the_memory_it_is_capped_to_runs_again_smaller_to_the_same_faces(small_weights):
    """A real failed allocation, wherever in the pass: the process capped between what one face
    and two faces take (tests/capped_memory.py), the batcher given two faces at once."""
    child = subprocess.run([sys.executable, "-m", "tests.capped_memory", str(small_weights)], cwd=ROOT,
                           capture_output=True, text=True, timeout=280,
                           env={**os.environ, "GFPGAN_TEST_DEVICE": "cpu"})
    assert child.returncode == 0, child.stderr[-3000:]
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found["two_faces_mb"] > found["one_face_mb"] + 100, found  # a cap can tell them apart
    assert found["ceiling"] == 1, found  # the batch of two ran out; each face then ran alone
    assert found["status"] == found["expected_status"] == [int(FaceStatus.ENHANCED)] * 2, found
    assert found["max_difference"] == 0, found  # what each face gave alone, to the bit


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="a cap on CUDA's caching allocator: on a GPU (the GPU check)")
def test_on_cuda_a_batch_past_the_memory_cap_runs_again_smaller_to_the_same_faces(pipeline):  # noqa: F811
    """A real CUDA out of memory: the caching allocator capped halfway between what a batch of 2
    and a batch of 4 take, the batcher given 8 faces at once. They come back the faces each gives
    alone (within the one level other batch sizes may round by), after the device ran out."""
    options = EnhanceOptions(alignment=Alignment.ALIGNED)
    faces = make_faces(8, seed=7)
    alone = np.concatenate([pipeline.enhance([Job(faces[i:i + 1], options)])[0].faces for i in range(8)])
    peak = {}
    for n in (2, 4):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        pipeline.enhance([Job(faces[:n], options)])
        peak[n] = torch.cuda.max_memory_allocated() - base
    assert peak[4] > 1.5 * peak[2], peak  # a cap between them tells them apart
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_reserved() + (peak[2] + peak[4]) // 2
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(TEST_DEVICE).total_memory,
                                               TEST_DEVICE)
    try:
        result, ceiling = enhance_through_batcher(pipeline, faces, options, max_batch_faces=8)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, TEST_DEVICE)
        torch.cuda.empty_cache()
    assert ceiling <= 2, (ceiling, peak)  # it ran out at 8 and at 4
    assert result.status == [FaceStatus.ENHANCED] * 8
    diff = np.abs(result.faces.astype(int) - alone)
    assert diff.max() <= 1, diff.max()


# --- the benchmark's memory step -----------------------------------------------------------------

class _CudaOfFake:
    """torch.cuda's memory calls, for a pipeline that says it is on CUDA: 100 MiB a face."""

    def __init__(self):
        self.peak = 0

    def patch(self, monkeypatch):
        cuda = torch.cuda
        for name in ("empty_cache", "synchronize", "reset_peak_memory_stats"):
            monkeypatch.setattr(cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda *a: 0)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(cuda, "max_memory_reserved", lambda *a: self.peak)
        monkeypatch.setattr(cuda, "get_device_properties", lambda *a: type("P", (), {"total_memory": 80 << 30}))


def test_the_memory_step_stops_doubling_at_the_batch_the_pipeline_has_no_memory_for(rng, monkeypatch):
    from server.bench import bench_memory

    fake = FakePipeline(out_of_memory_above=16)
    fake.device = torch.device("cuda")
    fake.speed = type("S", (), {"describe": lambda self: "defaults"})()
    memory = _CudaOfFake()
    memory.patch(monkeypatch)
    enhance = fake.enhance

    def measured(jobs):
        memory.peak = sum(job.faces.shape[0] for job in jobs) * 100 << 20
        return enhance(jobs)

    fake.enhance = measured
    # and what --max-batch-faces auto would choose beside it, from the pipeline's own line
    from server import memory as sizing
    fake.batch_memory = lambda: sizing.BatchMemory(per_face=100 << 20, fixed=0)
    monkeypatch.setattr(sizing, "cuda_budget", lambda device: (2 << 30, "2 GiB (test)"))
    table = bench_memory(fake, random_faces(rng, 4), [1, 4], OPTIONS, largest_probe=64)
    assert "| 16 | 1600 | 1600 | 1600 |" in table
    assert "| 32 | out of memory | | |" in table and "| 64 |" not in table
    assert "largest batch that ran: 16 faces" in table
    assert ("--max-batch-faces auto here: 16 faces: a batch takes 100 MiB a face and 0 MiB more "
            "(measured), 2000 MiB at 16 with 25% headroom; 2 GiB (test)") in table


def test_the_bench_process_goes_on_after_running_out_of_memory_but_not_after_a_cuda_error():
    from server.bench_plan import _leaves_device_unusable

    assert not _leaves_device_unusable(DeviceOutOfMemory(
        "the device ran out of memory on a batch of 64 faces (AcceleratorError: CUDA error: out of memory)"))
    assert not _leaves_device_unusable(torch.OutOfMemoryError("CUDA out of memory"))
    assert _leaves_device_unusable(RuntimeError("CUDA error: an illegal memory access was encountered"))

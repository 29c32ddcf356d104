"""The client against a fake FaceEnhancer on real loopback gRPC: answers, pipelining,
fallbacks, the circuit breaker, several targets, splitting, stats and a torch-free import.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from client import (
    Alignment,
    AsyncFaceEnhanceClient,
    BreakerConfig,
    EnhanceOptions,
    FaceEnhanceClient,
    FaceStatus,
    InvalidRequest,
    ModelSpec,
    RequestLimits,
    ServiceUnreachable,
)
from client.breaker import CircuitBreaker
from fake_service import FakeService, dead_address, fake_enhance

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64  # small faces keep the suite fast; the contract's smallest accepted side
OUT = 256


class FakeClock:
    """A monotonic clock the test moves by hand, to step through breaker cooldowns."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def random_faces(n: int, seed: int = 0, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def lanczos(faces: np.ndarray, size: int = OUT) -> np.ndarray:
    return np.stack([cv2.resize(np.ascontiguousarray(f), (size, size), interpolation=cv2.INTER_LANCZOS4)
                     for f in faces])


def assert_enhanced(result, faces, size: int = OUT) -> None:
    assert not result.fell_back and result.fallback_reason is None
    assert result.status == [FaceStatus.ENHANCED] * len(faces)
    np.testing.assert_array_equal(result.faces, fake_enhance(faces, size))


def assert_fell_back(result, faces, reason, size: int = OUT) -> None:
    assert result.fell_back
    assert result.fallback_reason in ((reason,) if isinstance(reason, str) else reason)
    assert result.status == [FaceStatus.FALLBACK] * len(faces)
    np.testing.assert_array_equal(result.faces, lanczos(faces, size))


@pytest.fixture
def fake():
    with FakeService() as service:
        yield service


@pytest.fixture
def second_fake():
    with FakeService() as service:
        yield service


@pytest.fixture
def nowhere():
    holder, address = dead_address()
    yield address
    holder.close()


# --- answers ---------------------------------------------------------------------------------

def test_each_face_comes_back_enhanced_in_order_from_a_negative_stride_view(fake):
    rgb = random_faces(5)
    bgr_view = rgb[..., ::-1]  # what MuseTalk's decode_latents returns
    assert bgr_view.strides[-1] < 0
    with FaceEnhanceClient(fake.address) as client:
        result = client.enhance(bgr_view)
    assert result.faces.shape == (5, OUT, OUT, 3) and result.faces.dtype == np.uint8
    assert_enhanced(result, bgr_view)
    assert result.faces.flags.writeable
    assert (result.queue_ms, result.compute_ms) == (1.0, 2.0)


def test_colour_channels_stay_in_place_blue_stays_blue(fake):
    faces = np.zeros((1, SIDE, SIDE, 3), np.uint8)
    faces[..., 0], faces[..., 1], faces[..., 2] = 200, 100, 30  # B, G, R
    with FaceEnhanceClient(fake.address) as client:
        result = client.enhance(faces)
    # The fake inverts each channel in place: B 200 -> 55, G 100 -> 155, R 30 -> 225.
    assert (result.faces[0] == [55, 155, 225]).all()


def test_output_size_512_comes_back_at_512(fake):
    faces = random_faces(2)
    with FaceEnhanceClient(fake.address, options=EnhanceOptions(output_size=512)) as client:
        result = client.enhance(faces)
    assert_enhanced(result, faces, size=512)


def test_twenty_batches_are_in_flight_on_one_stream_and_come_back_in_order(fake):
    # The fake answers nothing until 20 requests have arrived on the stream: only a client
    # that really keeps 20 batches in flight gets any answer before its deadline.
    fake.hold_until = 20
    batches = [random_faces(2, seed=i) for i in range(20)]
    with FaceEnhanceClient(fake.address, max_in_flight=20, timeout_ms=5000) as client:
        futures = [client.submit(faces) for faces in batches]
        results = [future.result(timeout=30) for future in futures]
    for faces, result in zip(batches, results):
        assert_enhanced(result, faces)
    assert fake.streams_opened == 1
    assert fake.requests == 20
    assert fake.answered_ids == sorted(fake.answered_ids)


def test_submit_takes_a_copy_so_the_caller_may_reuse_its_buffer(fake):
    fake.delay_s = 0.05
    buffer = random_faces(2)
    original = buffer.copy()
    with FaceEnhanceClient(fake.address) as client:
        future = client.submit(buffer)
        buffer[:] = 0
        result = future.result(timeout=10)
    assert_enhanced(result, original)


def test_landmarks_are_sent_per_face_and_split_with_their_faces(fake):
    fake.limits = RequestLimits(max_faces_per_request=2)
    faces = random_faces(3)
    # a face's five points (eyes, nose, mouth corners) inside the 64 px image, one per face
    layout = np.array([[20, 24], [44, 24], [32, 34], [24, 46], [40, 46]], np.float32)
    landmarks = np.stack([layout + k for k in range(3)])
    with FaceEnhanceClient(fake.address, options=EnhanceOptions(alignment=Alignment.LANDMARKS)) as client:
        result = client.enhance(faces, landmarks=landmarks)
    assert_enhanced(result, faces)
    assert fake.landmarks == [landmarks[:2].ravel().tolist(), landmarks[2:].ravel().tolist()]


def test_batches_submitted_together_at_start_reach_the_service_in_the_order_given(fake):
    """The first batch asks GetInfo for the service's limits; the batches submitted meanwhile
    wait for that answer instead of overtaking it, so a video's frames arrive in frame order
    (steady video smooths them in arrival order)."""
    fake.info_delay_s = 0.2
    with FaceEnhanceClient(fake.address, timeout_ms=3000, max_in_flight=8) as client:
        futures = [client.submit(np.full((2, SIDE, SIDE, 3), k, np.uint8)) for k in range(6)]
        results = [f.result() for f in futures]
    assert not any(r.fell_back for r in results)
    assert fake.first_bytes == list(range(6))


def test_a_steady_video_stays_on_one_target_and_one_stream(fake, second_fake):
    """The service keeps a video's alignment state per stream: with two targets and two
    streams each, steady batches all go down one stream of one target; others spread."""
    steady = EnhanceOptions(output_size=OUT, steady_video=True)
    with FaceEnhanceClient([fake.address, second_fake.address], streams_per_target=2) as client:
        for k in range(8):
            assert not client.enhance(random_faces(1, seed=k), options=steady).fell_back
        steady_counts = (fake.requests, second_fake.requests)
        steady_streams = (fake.streams_opened, second_fake.streams_opened)
        for k in range(8):
            client.enhance(random_faces(1, seed=k))
    assert sorted(steady_counts) == [0, 8]
    assert sorted(steady_streams) == [0, 1]
    assert min(fake.requests, second_fake.requests) >= 4  # plain batches went round-robin


def test_each_request_carries_the_time_left_before_the_client_stops_waiting(fake):
    faces = random_faces(2)
    with FaceEnhanceClient(fake.address, timeout_ms=1500) as client:
        client.enhance(faces)
        client.enhance(faces, timeout_ms=400)
    first, second = fake.timeouts_ms
    assert 1000 < first <= 1500 and 0 < second <= 400


def test_info_reports_what_the_service_serves(fake, nowhere):
    with FaceEnhanceClient([nowhere, fake.address]) as client:
        info = client.info()
    assert info.target == fake.address
    assert (info.model_name, info.max_faces_per_request, info.output_sizes) == ("GFPGANv1.4", 32, (256, 512, 1024))
    assert (info.model_file, info.arch, info.channel_multiplier) == ("GFPGANv1.4.pth", "clean", 2)
    assert info.limits.max_face_size == 512


def test_a_restarted_service_is_used_again_as_soon_as_its_health_says_serving(fake):
    """Issue 9: the breaker backed off to 30 s, so a worker kept falling back for up to 30 s
    after the service was SERVING again. While the circuit is open the client follows the
    target's Health/Watch and closes the circuit the moment it says SERVING."""
    faces = random_faces(2)
    breaker = BreakerConfig(failure_threshold=2, cooldown_s=30.0, max_cooldown_s=30.0)
    with FaceEnhanceClient(fake.address, timeout_ms=1000, breaker=breaker) as client:
        assert_enhanced(client.enhance(faces), faces)
        fake.stop()
        for _ in range(3):
            result = client.enhance(faces)
        assert_fell_back(result, faces, "circuit_open")
        fake.start()  # the same port, SERVING
        restarted = time.monotonic()
        while (result := client.enhance(faces)).fell_back and time.monotonic() - restarted < 10:
            time.sleep(0.05)
        recovered_s = time.monotonic() - restarted
    assert_enhanced(result, faces)
    assert recovered_s < 5.0, f"took {recovered_s:.1f} s with a 30 s breaker cooldown"
    assert fake.health_watches >= 1


def test_expect_model_sends_faces_only_to_a_target_that_serves_it(fake, second_fake):
    """Two replicas, one redeployed with another model: each is asked once what it serves, and
    every face goes to the one that serves the expected model."""
    second_fake.model = ("GFPGANv1.3.pth", "clean", 2)
    expect = ModelSpec(model_path=r"C:\models\GFPGANv1.4.pth", arch="clean", channel_multiplier=2)
    faces = random_faces(3)
    with FaceEnhanceClient([second_fake.address, fake.address], expect_model=expect) as client:
        results = [client.enhance(faces) for _ in range(4)]
    for result in results:
        assert_enhanced(result, faces)
    assert (fake.faces, second_fake.faces) == (12, 0)
    assert (fake.info_calls, second_fake.info_calls) == (1, 1)


def test_expect_model_falls_back_when_no_target_serves_it(fake):
    fake.model = ("GFPGANv1.4.pth", "clean", 1)
    faces = random_faces(2)
    with FaceEnhanceClient(fake.address, expect_model=ModelSpec(channel_multiplier=2)) as client:
        result = client.enhance(faces)
    assert_fell_back(result, faces, "wrong_model")
    assert "channel_multiplier is 2, but the service serves GFPGANv1.4 (GFPGANv1.4.pth, arch " \
           "clean, channel_multiplier 1)" in result.extra["fallback_detail"]
    assert fake.faces == 0


def test_model_spec_matches_by_file_name_or_served_name_and_names_what_is_missing():
    from client.aio import ServiceInfo

    info = ServiceInfo(target="t", model_name="GFPGANv1.4", model_version="1.4", weights_sha256="ab" * 32,
                       device="cuda:0", dtype="bfloat16", max_faces_per_request=32, min_face_size=64,
                       max_face_size=512, output_sizes=(256,), max_batch_faces=32, server_version="1",
                       model_file="gfpgan.pth", arch="clean", channel_multiplier=2)
    # the service knows its file as GFPGANv1.4 by its published hash though the file was renamed
    assert ModelSpec(model_path="models/gfpgan/GFPGANv1.4.pth").mismatches(info) == []
    assert ModelSpec(model_path="/srv/gfpgan.pth", sha256="AB" * 32).mismatches(info) == []
    assert ModelSpec(model_path="GFPGANv1.3.pth").mismatches(info)
    old = ServiceInfo(**{**info.__dict__, "arch": "", "channel_multiplier": 0})
    problems = ModelSpec(arch="clean", channel_multiplier=2).mismatches(old)
    assert len(problems) == 2 and "arch not reported" in problems[0]
    with pytest.raises(InvalidRequest, match="arch must be one of"):
        ModelSpec(arch="gfpgan").validate()


def test_info_with_no_service_raises_a_clear_error(nowhere):
    with FaceEnhanceClient(nowhere, timeout_ms=500) as client:
        with pytest.raises(ServiceUnreachable, match="no face-enhance service answered"):
            client.info()


# --- caller errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("faces, options, landmarks, message", [
    (np.zeros((1, SIDE, SIDE, 3), np.float32), None, None, "uint8"),
    (np.zeros((1, SIDE, SIDE, 4), np.uint8), None, None, r"\(N, H, W, 3\)"),
    (np.zeros((0, SIDE, SIDE, 3), np.uint8), None, None, "at least one face"),
    (np.zeros((1, SIDE, SIDE + 8, 3), np.uint8), None, None, "square"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(output_size=300), None, "output_size"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(fidelity=1.5), None, "fidelity"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(detect_every=3), None, "needs steady_video"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(steady_video=True, detect_every=0), None,
     "1..100"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(mask_every=3), None, "needs steady_video"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8),
     EnhanceOptions(steady_video=True, alignment=Alignment.ALIGNED, mask_every=3), None, "ALIGNED pastes nothing"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(steady_video=True, mask_every=101), None,
     "1..100"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(steady_video=True, mask_every=True), None,
     "whole number"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), EnhanceOptions(alignment=Alignment.LANDMARKS), None,
     "needs landmarks"),
    (np.zeros((2, SIDE, SIDE, 3), np.uint8), EnhanceOptions(alignment=Alignment.LANDMARKS),
     np.zeros((1, 5, 2)), r"\(N, 5, 2\)"),
    (np.zeros((1, SIDE, SIDE, 3), np.uint8), None, np.zeros((1, 5, 2)), "only used with"),
])
def test_caller_errors_raise_at_once_and_send_nothing(fake, faces, options, landmarks, message):
    with FaceEnhanceClient(fake.address) as client:
        with pytest.raises(InvalidRequest, match=message):
            client.submit(faces, options, landmarks)
        assert client.stats()["batches_by_outcome"] == {"enhanced": 0, "fallback": 0, "invalid": 1}
    assert fake.requests == 0


def test_a_request_the_service_rejects_raises_invalid_request(fake):
    fake.error = (grpc.StatusCode.INVALID_ARGUMENT, "faces.data has 7 bytes")
    with FaceEnhanceClient(fake.address) as client:
        with pytest.raises(InvalidRequest, match="faces.data has 7 bytes"):
            client.enhance(random_faces(1))
        stats = client.stats()
    assert stats["batches_by_outcome"]["invalid"] == 1 and stats["fallbacks"] == {}
    assert stats["targets"][fake.address]["breaker"] == "closed"


# --- fallbacks -------------------------------------------------------------------------------

def test_a_slow_service_gets_a_lanczos_resize_after_the_timeout_and_no_exception(fake):
    fake.delay_s = 2.0
    faces = random_faces(3)[..., ::-1]
    with FaceEnhanceClient(fake.address, timeout_ms=200) as client:
        result = client.enhance(faces)
    assert_fell_back(result, faces, "timeout")


def test_a_dead_address_falls_back_without_raising(nowhere):
    faces = random_faces(2)
    with FaceEnhanceClient(nowhere, timeout_ms=1000) as client:
        result = client.enhance(faces, options=EnhanceOptions(output_size=512))
    assert_fell_back(result, faces, ("unavailable", "transport"), size=512)


@pytest.mark.parametrize("code, reason", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted"),
    (grpc.StatusCode.UNAVAILABLE, "unavailable"),
    (grpc.StatusCode.INTERNAL, "internal"),
])
def test_an_in_band_refusal_falls_back_with_its_reason(fake, code, reason):
    fake.error = (code, "the queue is full")
    faces = random_faces(2)
    with FaceEnhanceClient(fake.address) as client:
        result = client.enhance(faces)
    assert_fell_back(result, faces, reason)
    assert fake.requests == 1


def test_a_late_answer_is_dropped_and_the_next_batch_gets_its_own(fake):
    fake.delay_s = 0.5
    first, second = random_faces(1, seed=1), random_faces(1, seed=2)
    with FaceEnhanceClient(fake.address, timeout_ms=100) as client:
        assert client.enhance(first).fallback_reason == "timeout"
        fake.delay_s = 0.0
        # The fake answers `first` late, on the same stream, before `second`.
        result = client.enhance(second, timeout_ms=5000)
    assert_enhanced(result, second)
    assert fake.streams_opened == 1 and len(fake.answered_ids) == 2


def test_a_dropped_stream_falls_back_and_the_next_batch_opens_a_new_one(fake):
    fake.drop_next_stream_at = 2
    batches = [random_faces(1, seed=i) for i in range(3)]
    with FaceEnhanceClient(fake.address, timeout_ms=2000) as client:
        results = [client.enhance(faces) for faces in batches]
    assert_enhanced(results[0], batches[0])
    assert_fell_back(results[1], batches[1], ("unavailable", "transport"))
    assert_enhanced(results[2], batches[2])
    assert fake.streams_opened == 2


class _CallThatDies:
    """An EnhanceBatch call whose connection is gone: its reader sees the call end UNAVAILABLE,
    and a write never finishes (as on a call that failed under it in grpcio before
    grpc/grpc#34148; MuseTalk-era environments pin such versions)."""

    def __init__(self, writes_finish: bool):
        self.writes_finish = writes_finish
        self.cancelled = False
        self._ended = asyncio.get_running_loop().create_future()

    async def write(self, request):
        if not self.writes_finish:
            await asyncio.get_running_loop().create_future()  # never resolves

    async def read(self):
        await asyncio.sleep(0.05)
        return grpc.aio.EOF

    async def code(self):
        return grpc.StatusCode.UNAVAILABLE

    async def details(self):
        return "Socket closed"

    def done(self):
        return self.cancelled

    def cancel(self):
        self.cancelled = True
        return True


@pytest.mark.parametrize("writes_finish", [True, False])
async def test_a_stream_that_dies_answers_its_batch_at_once_even_when_the_write_never_finishes(writes_finish):
    """The batch gets the stream's end (unavailable) as soon as its reader sees it, not at the
    deadline: the wait for its answer does not queue behind a write that may never finish, and
    the next batch opens a new call."""
    from contract.pb import face_enhance_pb2 as pb
    from client.targets import BatchStream, StreamBroken

    calls = []

    class Stub:
        def EnhanceBatch(self, metadata=None):
            calls.append(_CallThatDies(writes_finish))
            return calls[-1]

    stream = BatchStream(Stub(), max_in_flight=1)
    for attempt in (1, 2):
        started = time.monotonic()
        with pytest.raises(StreamBroken) as broken:
            await asyncio.wait_for(stream.request(pb.EnhanceRequest(request_id=attempt)), timeout=5)
        assert broken.value.reason == "unavailable" and "Socket closed" in str(broken.value)
        assert time.monotonic() - started < 2
        assert len(calls) == attempt and stream.in_flight == 0


def test_a_restarted_service_is_used_again(fake):
    clock = FakeClock()
    faces = random_faces(2)
    with FaceEnhanceClient(fake.address, timeout_ms=500, breaker=BreakerConfig(clock=clock)) as client:
        assert_enhanced(client.enhance(faces), faces)
        fake.stop()
        down = [client.enhance(faces) for _ in range(3)]
        assert {r.fallback_reason for r in down} <= {"unavailable", "transport", "timeout"}, \
            [r.extra for r in down]
        fake.start()
        clock.advance(60)  # past any cooldown
        # The channel reconnects within its (shortened) backoff; bounded retries, no sleeps
        # in the assertion itself.
        for _ in range(50):
            result = client.enhance(faces)
            if not result.fell_back:
                break
            clock.advance(60)
            time.sleep(0.1)
        assert_enhanced(result, faces)
        assert client.stats()["targets"][fake.address]["breaker"] == "closed"
    assert fake.streams_opened >= 2


# --- circuit breaker -------------------------------------------------------------------------

def test_the_breaker_stops_calling_a_failing_service_then_a_probe_closes_it(fake):
    clock = FakeClock()
    fake.delay_s = 1.0
    faces = random_faces(1)
    breaker = BreakerConfig(failure_threshold=3, cooldown_s=2.0, clock=clock)
    with FaceEnhanceClient(fake.address, timeout_ms=100, breaker=breaker) as client:
        assert [client.enhance(faces).fallback_reason for _ in range(3)] == ["timeout"] * 3
        assert fake.requests == 3
        assert client.stats()["targets"][fake.address]["breaker"] == "open"

        # Open: answered at once by the fallback, the service is not called.
        result = client.enhance(faces)
        assert_fell_back(result, faces, "circuit_open")
        assert fake.requests == 3

        fake.delay_s = 0.0
        clock.advance(1.9)
        assert client.enhance(faces).fallback_reason == "circuit_open"
        clock.advance(0.2)  # cooldown over: the next batch is the probe
        assert_enhanced(client.enhance(faces, timeout_ms=5000), faces)
        assert fake.requests == 4
        assert client.stats()["targets"][fake.address]["breaker"] == "closed"
        assert_enhanced(client.enhance(faces, timeout_ms=5000), faces)


def test_a_failed_probe_doubles_the_cooldown_up_to_the_maximum():
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=2, cooldown_s=1.0, max_cooldown_s=3.0,
                                           clock=clock))
    assert breaker.allow() and not breaker.record_failure()
    assert breaker.allow() and breaker.record_failure()  # second in a row opens it
    assert breaker.state == "open" and not breaker.allow()
    cooldowns = []
    for _ in range(3):
        clock.advance(breaker.cooldown_s)
        assert breaker.state == "half_open"
        assert breaker.allow()          # the one probe
        assert not breaker.allow()      # nobody else while it is out
        assert breaker.record_failure()  # probe failed: open again, longer
        cooldowns.append(breaker.cooldown_s)
    assert cooldowns == [2.0, 3.0, 3.0]
    clock.advance(3.0)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.cooldown_s == 1.0 and breaker.allow()


def test_an_abandoned_probe_lets_the_next_batch_probe():
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=1.0, clock=clock))
    breaker.record_failure()
    clock.advance(1.0)
    assert breaker.allow() and not breaker.allow()
    breaker.release()
    assert breaker.allow()


# --- several targets -------------------------------------------------------------------------

def test_batches_are_spread_round_robin_over_two_targets(fake, second_fake):
    batches = [random_faces(1, seed=i) for i in range(10)]
    with FaceEnhanceClient([fake.address, second_fake.address]) as client:
        results = [client.enhance(faces) for faces in batches]
    for faces, result in zip(batches, results):
        assert_enhanced(result, faces)
    assert (fake.requests, second_fake.requests) == (5, 5)


def test_with_one_target_dead_every_batch_is_still_enhanced_and_its_breaker_opens(fake, nowhere):
    clock = FakeClock()
    batches = [random_faces(1, seed=i) for i in range(10)]
    with FaceEnhanceClient([nowhere, fake.address], breaker=BreakerConfig(clock=clock)) as client:
        results = [client.enhance(faces) for faces in batches]
        stats = client.stats()
    for faces, result in zip(batches, results):
        assert_enhanced(result, faces)  # a refused batch is retried on the live target
    assert fake.requests == 10
    assert stats["targets"][nowhere]["breaker"] == "open"
    assert stats["targets"][nowhere]["failures"] == 3  # then no more batches went there
    assert stats["fallbacks"] == {}


def test_a_balanced_name_spreads_its_streams_over_the_replicas(fake, second_fake):
    # "ipv4:a,b" resolves to two backends exactly like a dns:/// name with two records.
    target = f"ipv4:{fake.address},{second_fake.address}"
    batches = [random_faces(1, seed=i) for i in range(8)]
    with FaceEnhanceClient(target, streams_per_target=2) as client:
        client.info()  # connects the channel; round_robin then sees both replicas ready
        time.sleep(0.3)
        futures = [client.submit(faces) for faces in batches]
        results = [future.result(timeout=10) for future in futures]
    for faces, result in zip(batches, results):
        assert_enhanced(result, faces)
    assert (fake.streams_opened, second_fake.streams_opened) == (1, 1)
    assert fake.requests > 0 and second_fake.requests > 0
    assert fake.requests + second_fake.requests == 8


def test_every_target_down_falls_back_and_later_batches_skip_the_timeout(nowhere):
    holder, other = dead_address()
    clock = FakeClock()
    faces = random_faces(1)
    try:
        with FaceEnhanceClient([nowhere, other], breaker=BreakerConfig(failure_threshold=1, clock=clock)) as client:
            first = client.enhance(faces)
            second = client.enhance(faces)
    finally:
        holder.close()
    assert_fell_back(first, faces, ("unavailable", "transport"))
    assert_fell_back(second, faces, "circuit_open")


# --- splitting -------------------------------------------------------------------------------

def test_a_batch_above_max_faces_per_request_is_split_and_reassembled_in_order(fake):
    fake.limits = RequestLimits(max_faces_per_request=4)
    faces = random_faces(10)[..., ::-1]
    with FaceEnhanceClient(fake.address) as client:
        result = client.enhance(faces)
        client.enhance(faces[:3])
    assert_enhanced(result, faces)
    assert fake.face_counts == [4, 4, 2, 3]
    assert fake.info_calls == 1  # learned once


def test_the_limit_is_learned_from_a_live_target_when_the_first_is_dead(fake, nowhere):
    fake.limits = RequestLimits(max_faces_per_request=4)
    faces = random_faces(10)
    with FaceEnhanceClient([nowhere, fake.address]) as client:
        result = client.enhance(faces)
    assert_enhanced(result, faces)
    assert sorted(fake.face_counts) == [2, 4, 4]


def test_a_split_batch_with_a_failed_part_marks_only_those_faces(fake):
    fake.limits = RequestLimits(max_faces_per_request=2)
    fake.drop_next_stream_at = 2  # the second part's stream breaks
    faces = random_faces(4)
    with FaceEnhanceClient(fake.address, max_in_flight=1) as client:
        result = client.enhance(faces)
    assert result.fell_back and result.fallback_reason in ("unavailable", "transport")
    assert result.status == [FaceStatus.ENHANCED] * 2 + [FaceStatus.FALLBACK] * 2
    np.testing.assert_array_equal(result.faces[:2], fake_enhance(faces[:2], OUT))
    np.testing.assert_array_equal(result.faces[2:], lanczos(faces[2:]))


def test_closing_the_client_answers_the_batches_still_in_flight(fake):
    fake.hold_until = 1000  # the fake never answers
    batches = [random_faces(1, seed=i) for i in range(3)]
    client = FaceEnhanceClient(fake.address, timeout_ms=30_000)
    futures = [client.submit(faces) for faces in batches]
    while fake.requests < 3:  # all three are on the wire
        time.sleep(0.01)
    client.close()
    for faces, future in zip(batches, futures):
        assert_fell_back(future.result(timeout=1), faces, ("transport", "unavailable"))
    with pytest.raises(RuntimeError, match="closed"):
        client.submit(batches[0])


def test_closing_the_client_leaves_no_task_pending_on_its_loop(fake, caplog):
    """gRPC's aio calls keep tasks of their own on the client's loop (one per call waits for
    its status). One still pending when the loop closed was destroyed later, and Python printed
    "Task was destroyed but it is pending!" on the caller's stderr (the soak script showed it
    at exit in 2 runs of 3). Here a task stands in for gRPC's: it waits on a future that nothing
    ends, like a status that comes after the stream is gone."""
    import gc

    client = FaceEnhanceClient(fake.address, timeout_ms=5000)
    assert_enhanced(client.enhance(random_faces(2)), random_faces(2))

    async def wait_forever():
        await asyncio.get_running_loop().create_future()

    left_behind = asyncio.run_coroutine_threadsafe(_start(wait_forever), client._loop).result(5)
    client.close()
    assert left_behind.cancelled()
    assert not asyncio.all_tasks(client._loop)
    with caplog.at_level("ERROR", logger="asyncio"):
        del left_behind
        gc.collect()
    assert "destroyed but it is pending" not in caplog.text


async def _start(coroutine_function) -> asyncio.Task:
    task = asyncio.ensure_future(coroutine_function())
    await asyncio.sleep(0)  # it runs up to its wait
    return task


# --- stats and metrics -----------------------------------------------------------------------

def test_stats_and_prometheus_metrics_count_what_happened(fake):
    registry = CollectorRegistry()
    # Only the late batch has a short deadline: on a loaded machine the others must not time out.
    with FaceEnhanceClient(fake.address, timeout_ms=5000, registry=registry) as client:
        client.enhance(random_faces(3))
        client.enhance(random_faces(2))
        fake.delay_s = 0.5
        client.enhance(random_faces(4), timeout_ms=150)
        fake.delay_s = 0.0
        fake.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        # Answers come in order per stream: this one waits behind the late one above.
        client.enhance(random_faces(1), timeout_ms=5000)
        with pytest.raises(InvalidRequest):
            client.enhance(np.zeros((1, SIDE, SIDE, 3), np.float32))
        stats = client.stats()

    assert stats["batches"] == 5
    assert stats["batches_by_outcome"] == {"enhanced": 2, "fallback": 2, "invalid": 1}
    assert (stats["faces"], stats["enhanced_faces"]) == (10, 5)
    assert stats["faces_by_status"]["fallback"] == 5
    assert stats["fallbacks"] == {"timeout": 1, "resource_exhausted": 1}
    assert stats["mean_latency_ms"] > 0

    def sample(name, **labels):
        return registry.get_sample_value(name, labels)

    assert sample("faceenhance_client_batches_total", outcome="enhanced") == 2
    assert sample("faceenhance_client_batches_total", outcome="fallback") == 2
    assert sample("faceenhance_client_batches_total", outcome="invalid") == 1
    assert sample("faceenhance_client_faces_total", status="enhanced") == 5
    assert sample("faceenhance_client_faces_total", status="fallback") == 5
    assert sample("faceenhance_client_fallbacks_total", reason="timeout") == 1
    assert sample("faceenhance_client_fallbacks_total", reason="resource_exhausted") == 1
    assert sample("faceenhance_client_request_duration_seconds_count", outcome="enhanced") == 2
    assert sample("faceenhance_client_request_duration_seconds_count", outcome="fallback") == 2


def test_two_clients_can_share_one_registry(fake):
    registry = CollectorRegistry()
    with FaceEnhanceClient(fake.address, registry=registry) as a, \
            FaceEnhanceClient(fake.address, registry=registry) as b:
        a.enhance(random_faces(1))
        b.enhance(random_faces(1))
    assert registry.get_sample_value("faceenhance_client_batches_total", {"outcome": "enhanced"}) == 2


# --- asyncio API -----------------------------------------------------------------------------

async def test_the_asyncio_client_enhances_concurrent_batches_and_falls_back(fake):
    batches = [random_faces(2, seed=i)[..., ::-1] for i in range(6)]
    async with AsyncFaceEnhanceClient(fake.address, max_in_flight=6, timeout_ms=5000) as client:
        results = await asyncio.gather(*(client.enhance(faces) for faces in batches))
        for faces, result in zip(batches, results):
            assert_enhanced(result, faces)
        fake.delay_s = 2.0
        slow = await client.enhance(batches[0], timeout_ms=100)
        assert_fell_back(slow, batches[0], "timeout")
        assert (await client.info()).model_name == "GFPGANv1.4"
        assert client.stats()["batches_by_outcome"] == {"enhanced": 6, "fallback": 1, "invalid": 0}


async def test_a_batch_whose_stream_the_opening_circuit_closes_falls_back_as_circuit_open(fake):
    """Seen in CI: one batch's timeout opened the circuit, which closed the stream another batch
    was waiting on, and that batch fell back as a broken transport. It is the circuit's: it
    falls back at once as circuit_open, and is not counted as another failure."""
    faces = random_faces(1)
    breaker = BreakerConfig(failure_threshold=1, cooldown_s=30.0, max_cooldown_s=30.0)
    async with AsyncFaceEnhanceClient(fake.address, timeout_ms=5000, max_in_flight=2, breaker=breaker) as client:
        await client.info()  # connected, so the short deadline below is the service's delay alone
        fake.delay_s = 1.0
        started = time.monotonic()
        short = asyncio.ensure_future(client.enhance(faces, timeout_ms=200))
        waiting = asyncio.ensure_future(client.enhance(faces, timeout_ms=5000))
        short, waiting = await short, await waiting
        assert_fell_back(short, faces, "timeout")
        assert_fell_back(waiting, faces, "circuit_open")
        assert "closed this batch's stream" in waiting.extra.get("fallback_detail", "")
        assert time.monotonic() - started < 0.9  # before the service's answer, not after
        assert client.targets[0].failures == 1


async def test_a_batch_whose_stream_the_client_resets_is_sent_again_and_enhanced(fake):
    """A stream this client closes under a waiting batch (another batch's write cut off at its
    deadline does) is not the service's failure: the batch goes again on a fresh stream within
    its deadline, and the breaker counts nothing."""
    faces = random_faces(2)
    async with AsyncFaceEnhanceClient(fake.address, timeout_ms=5000) as client:
        await client.info()
        fake.delay_s = 0.3
        batch = asyncio.ensure_future(client.enhance(faces))
        while fake.requests == 0:
            await asyncio.sleep(0.01)
        client.targets[0].reset_streams()
        assert_enhanced(await batch, faces)
        assert fake.requests == 2 and fake.streams_opened == 2
        assert client.targets[0].failures == 0


async def test_a_cancelled_batch_does_not_leave_the_breaker_stuck(fake):
    clock = FakeClock()
    faces = random_faces(1)
    breaker = BreakerConfig(failure_threshold=1, cooldown_s=1.0, clock=clock)
    async with AsyncFaceEnhanceClient(fake.address, timeout_ms=100, breaker=breaker) as client:
        fake.delay_s = 1.0
        assert (await client.enhance(faces)).fallback_reason == "timeout"  # opens the circuit
        clock.advance(1.0)
        probe = asyncio.ensure_future(client.enhance(faces, timeout_ms=5000))
        await asyncio.sleep(0.2)
        probe.cancel()  # the caller gives up on the probe
        with pytest.raises(asyncio.CancelledError):
            await probe
        fake.delay_s = 0.0
        assert_enhanced(await client.enhance(faces, timeout_ms=5000), faces)


# --- packaging -------------------------------------------------------------------------------

def test_the_client_imports_and_works_without_torch_or_gfpgan(nowhere):
    script = textwrap.dedent(f"""
        import sys

        class Blocked:
            BLOCKED = {{"torch", "torchvision", "gfpgan", "basicsr", "facexlib"}}
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"{{name}} is blocked: the client must not need it")
                return None

        sys.meta_path.insert(0, Blocked())
        import numpy as np
        import client
        from client import FaceEnhanceClient, AsyncFaceEnhanceClient, BreakerConfig
        import client.aio, client.sync, client.fallback, client.breaker, client.targets, client.metrics
        import contract.codec, contract.types, contract.pb.face_enhance_pb2_grpc
        with FaceEnhanceClient({nowhere!r}, timeout_ms=500) as c:
            result = c.enhance(np.zeros((2, 64, 64, 3), np.uint8))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in Blocked.BLOCKED)
        print(result.fell_back, result.faces.shape, heavy)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True (2, 256, 256, 3) []"

"""Steady video (issue 11): one stream's alignment smoothed over time, before the warp.

The filter itself (server/steady.py) on synthetic landmark tracks; the pipeline (a static face
whose landmarks jitter gives identical output frames once settled; two videos in one device
batch keep their own state); the service (one state per EnhanceBatch stream, frames in order,
over real loopback gRPC).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from client import codec
from client.pb import face_enhance_pb2_grpc as pb_grpc
from client.types import Alignment, EnhanceOptions, FaceStatus
from server.jobs import Job
from server.pipeline import FacePipeline
from server.speed import SpeedOptions
from server.steady import CUT_EYE_DISTANCES, MAX_GAP_FRAMES, VideoState
from tests.device import TEST_DEVICE
from tests.faces import make_faces, template_landmarks
from tests.fakes import FakePipeline
from tests.test_pipeline import load_nets
from tests.test_server import channel, running

#: A frontal face's 5 points, eyes 60 px apart, in a 256 px crop.
FACE = np.array([[100, 100], [160, 100], [130, 130], [108, 160], [152, 160]], np.float64)


def track(points: list[np.ndarray]) -> np.ndarray:
    video = VideoState()
    return np.array([video.smooth(p) for p in points])


# --- the filter ----------------------------------------------------------------------------------

def test_a_static_face_settles_to_exactly_the_same_alignment():
    rng = np.random.default_rng(0)
    start = FACE + rng.normal(0, 2, FACE.shape)  # the first detection is off by a little
    out = track([start] + [FACE] * 40)
    settled = out[15:]
    assert (settled == settled[0]).all()  # identical frame after frame
    assert np.linalg.norm(settled[0] - FACE, axis=1).mean() <= 0.01 * 60  # within the dead zone


def test_jitter_on_a_static_face_is_at_least_halved():
    rng = np.random.default_rng(1)
    raw = np.array([FACE + rng.normal(0, 1.0, FACE.shape) for _ in range(200)])
    out = track(list(raw))
    change = lambda a: np.abs(np.diff(a[20:], axis=0)).mean()  # noqa: E731
    assert change(out) < change(raw) / 2, (change(out), change(raw))


@pytest.mark.parametrize("px_per_frame", [1.0, 3.0])
def test_a_moving_face_is_followed_within_a_frame(px_per_frame):
    moving = [FACE + [px_per_frame * t, 0.3 * px_per_frame * t] for t in range(60)]
    out = track(moving)
    lag_frames = (np.array(moving)[30:, 0, 0] - out[30:, 0, 0]).mean() / px_per_frame
    assert 0 <= lag_frames <= 1.0, lag_frames


def test_a_cut_starts_afresh_at_once():
    other = FACE * 0.8 + [90, 40]  # another face, elsewhere
    video = VideoState()
    for _ in range(20):
        video.smooth(FACE)
    first_after = video.smooth(other)
    assert video.resets == 1
    assert np.allclose(first_after, other)  # no blend of the two faces
    assert np.linalg.norm(FACE - other, axis=1).mean() / 48 > CUT_EYE_DISTANCES


@pytest.mark.parametrize("other", [
    FACE * 1.11 - 13,                                    # another face in place, 11% larger
    (FACE - FACE.mean(0)) @ np.array([[np.cos(0.14), -np.sin(0.14)], [np.sin(0.14), np.cos(0.14)]])
    + FACE.mean(0),                                      # turned by 8 degrees in one frame
])
def test_another_face_in_the_same_place_is_a_cut_too(other):
    video = VideoState()
    for _ in range(10):
        video.smooth(FACE)
    assert np.allclose(video.smooth(other), other) and video.resets == 1


def test_a_face_lost_for_longer_than_the_gap_starts_afresh_and_a_short_gap_does_not():
    video = VideoState()
    for _ in range(10):
        video.smooth(FACE)
    for _ in range(MAX_GAP_FRAMES):
        video.skip()
    video.smooth(FACE + 2)
    assert video.resets == 0
    for _ in range(MAX_GAP_FRAMES + 1):
        video.skip()
    back = video.smooth(FACE + 4)
    assert video.resets == 1 and np.allclose(back, FACE + 4)


# --- the pipeline --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(small_weights):
    """The box paste mask: no ParseNet pass (seconds per face on these CPUs); the alignment,
    which is what steady video changes, is the same."""
    gfpgan, detector, parser = load_nets(small_weights)
    return FacePipeline(gfpgan, detector, parser, device=TEST_DEVICE, dtype=torch.float32,
                        speed=SpeedOptions(paste_mask="box"))


def jittered_video(frames: int, seed: int, jitter_px: float = 0.4):
    """The same face in every frame, its given landmarks jittering like a detector's."""
    face = make_faces(1, seed=seed)
    points = template_landmarks(1, seed=seed)[0]
    rng = np.random.default_rng(seed)
    return (np.repeat(face, frames, axis=0),
            np.stack([points + rng.normal(0, jitter_px, points.shape) for _ in range(frames)]).astype(np.float32))


def test_a_static_face_gives_identical_output_frames_once_settled_and_stays_jittery_without(pipeline):
    faces, points = jittered_video(12, seed=2, jitter_px=0.25)
    options = EnhanceOptions(alignment=Alignment.LANDMARKS)
    steady = EnhanceOptions(alignment=Alignment.LANDMARKS, steady_video=True)
    video = VideoState()
    # one frame per request, as a video arrives; the state carries across requests
    out = np.concatenate([pipeline.enhance([Job(faces[t:t + 1], steady, points[t:t + 1], video=video)])[0].faces
                          for t in range(12)])
    plain = pipeline.enhance([Job(faces, options, points)])[0].faces
    diff = lambda a: np.abs(np.diff(a.astype(int), axis=0)).max(axis=(1, 2, 3))  # noqa: E731
    assert (diff(out)[6:] == 0).all(), diff(out)
    assert (diff(plain) > 0).all()  # the jitter reaches the output when nothing smooths it


def test_two_videos_in_one_device_batch_keep_their_own_state(pipeline):
    """Frames of two streams interleaved in one batch give what each gives alone."""
    a_faces, a_points = jittered_video(6, seed=3)
    b_faces, b_points = jittered_video(6, seed=4)
    steady = EnhanceOptions(alignment=Alignment.LANDMARKS, steady_video=True)
    state_a, state_b = VideoState(), VideoState()
    alone_a = pipeline.enhance([Job(a_faces, steady, a_points, video=state_a)])[0].faces
    alone_b = pipeline.enhance([Job(b_faces, steady, b_points, video=state_b)])[0].faces
    va, vb = VideoState(), VideoState()
    together = []
    for t in range(0, 6, 2):  # each batch: 2 frames of A, then 2 of B
        a, b = pipeline.enhance([Job(a_faces[t:t + 2], steady, a_points[t:t + 2], video=va),
                                 Job(b_faces[t:t + 2], steady, b_points[t:t + 2], video=vb)])
        together.append((a.faces, b.faces))
    # The filter runs on the host in float64: each stream's state is exactly its own.
    assert va.frame == vb.frame == 6
    assert np.array_equal(va.points, state_a.points) and np.array_equal(vb.points, state_b.points)
    # The faces: the networks ran on batches of 4 here and 6 alone, and the CPU's convolution
    # kernels may round differently per batch size (torch 2.14.1: 1 level on 23 of 1.2 million
    # values). A frame warped with the other video's alignment would differ everywhere.
    for got, alone in ((np.concatenate([a for a, _ in together]), alone_a),
                       (np.concatenate([b for _, b in together]), alone_b)):
        diff = np.abs(got.astype(int) - alone)
        assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


# --- skip detection (detect_every) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def detecting(tmp_path_factory, small_weights):
    """A pipeline whose random-valued detector is calibrated to find make_faces' faces, its
    detector wrapped to count the images it is given and to find nothing in a plain grey image
    (the calibrated detector finds a face in anything)."""
    from tests.faces import weights_with_detector

    weights = weights_with_detector(tmp_path_factory.mktemp("steady_detect"), small_weights)
    gfpgan, detector, parser = load_nets(weights)
    pipe = FacePipeline(gfpgan, detector, parser, device=TEST_DEVICE, dtype=torch.float32,
                        speed=SpeedOptions(paste_mask="box"))
    pipe.detected = 0
    candidates = pipe.detector.candidates

    def counted(images):
        pipe.detected += images.shape[0]
        found, usable = candidates(images)
        blank = images.flatten(1).std(dim=1) == 0
        return found, usable & ~blank[found.image]

    pipe.detector.candidates = counted
    return pipe


def run_video(pipe, frames: np.ndarray, every: int, per_request: int = 2):
    """The frames through one stream's state, `per_request` frames per device batch."""
    options = EnhanceOptions(steady_video=True, detect_every=every)
    video, faces, status = VideoState(), [], []
    pipe.detected = 0
    for t in range(0, len(frames), per_request):
        [result] = pipe.enhance([Job(frames[t:t + per_request], options, video=video)])
        faces.append(result.faces)
        status += result.status
    return np.concatenate(faces), status, pipe.detected, video


def test_skip_detection_detects_every_nth_frame_and_reuses_the_alignment_between(detecting):
    still = np.repeat(make_faces(1, seed=3), 10, axis=0)
    every_frame, status_1, detected_1, _ = run_video(detecting, still, every=1)
    skipping, status_3, detected_3, video = run_video(detecting, still, every=3)
    assert status_1 == status_3 == [FaceStatus.ENHANCED] * 10
    assert detected_1 == 10
    # frames 0 and 1 (no face held yet), then 3, 6 and 9 of the stream
    assert detected_3 == 5 and video.reused == 5
    # the same still face detected or held: the same alignment, the same pixels
    assert np.array_equal(skipping, every_frame)


def test_a_face_gone_at_a_detected_frame_is_not_restored_in_the_frames_after_it(detecting):
    face = make_faces(1, seed=3)
    blank = np.full_like(face, 128)
    frames = np.concatenate([np.repeat(face, 4, 0), np.repeat(blank, 4, 0), np.repeat(face, 2, 0)])
    out, status, detected, video = run_video(detecting, frames, every=2, per_request=4)
    enhanced, gone = FaceStatus.ENHANCED, FaceStatus.NO_FACE
    # frames 4..7: 4 detected (nothing), 5 not detected and not held, 6 detected, 7 as 5
    assert status == [enhanced] * 4 + [gone] * 4 + [enhanced] * 2
    assert detected == 4 + 2 + 2 and video.reused == 0
    assert (out[4:8] == 128).all()  # returned as they came, not painted with the old face


def test_skip_detection_counts_frames_in_order_across_two_jobs_of_one_stream_in_one_batch(detecting):
    """Two requests of one stream in one device batch plan their frames one after the other."""
    still = np.repeat(make_faces(1, seed=3), 6, axis=0)
    options = EnhanceOptions(steady_video=True, detect_every=2)
    video = VideoState()
    detecting.enhance([Job(still[:1], options, video=video)])  # hold the face
    detecting.detected = 0
    a, b = detecting.enhance([Job(still[1:3], options, video=video), Job(still[3:6], options, video=video)])
    assert a.status + b.status == [FaceStatus.ENHANCED] * 5
    assert detecting.detected == 2 and video.reused == 3  # frames 2 and 4 detected; 1, 3, 5 held
    assert video.frame == 6


# --- the service ---------------------------------------------------------------------------------

class _Recording(FakePipeline):
    """Records which video state each job carried, and each face's frame number."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[object, int]] = []  # (the state itself: kept alive, ids stay unique)

    def enhance(self, jobs):
        for job in jobs:
            for face in job.faces:
                self.seen.append((job.video, int(face[0, 0, 0])))
        return super().enhance(jobs)


def frames(first: int, count: int) -> np.ndarray:
    out = np.zeros((count, 64, 64, 3), np.uint8)
    for k in range(count):
        out[k] = first + k  # the frame number, in every pixel
    return out


async def test_each_stream_has_its_own_state_and_its_frames_reach_it_in_order():
    pipeline = _Recording()
    steady = EnhanceOptions(output_size=256, steady_video=True)
    async with running(pipeline) as app, channel(app) as ch_a, channel(app) as ch_b:
        stub_a, stub_b = pb_grpc.FaceEnhancerStub(ch_a), pb_grpc.FaceEnhancerStub(ch_b)
        call_a, call_b = stub_a.EnhanceBatch(), stub_b.EnhanceBatch()
        for k in range(6):  # interleaved: A's frames 0.., B's frames 100..
            await call_a.write(codec.encode_request(k, frames(3 * k, 3), steady))
            await call_b.write(codec.encode_request(k, frames(100 + 2 * k, 2), steady))
        await call_a.write(codec.encode_request(9, frames(200, 1), EnhanceOptions(output_size=256)))
        for call in (call_a, call_b):
            await call.done_writing()
        answers = [r async for r in call_a] + [r async for r in call_b]
        unary = [await stub_a.Enhance(codec.encode_request(50 + k, frames(210 + k, 1), steady))
                 for k in range(2)]
    assert not any(r.HasField("error") for r in answers + unary)
    by_video: dict = {}
    for video, frame in pipeline.seen:
        by_video.setdefault(None if video is None else id(video), []).append(frame)
    plain = by_video.pop(None)
    assert plain == [200]  # a request without steady_video carries no state
    orders = sorted(by_video.values())
    # one state per stream, each stream's frames in order, and one per unary request
    assert orders == [list(range(0, 18)), list(range(100, 112)), [210], [211]]

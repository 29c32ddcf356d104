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

from contract import codec
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from contract.types import Alignment, EnhanceOptions, FaceStatus
from server.jobs import DeviceOutOfMemory, Job
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
def detecting_weights(tmp_path_factory, small_weights):
    from tests.faces import weights_with_detector

    return weights_with_detector(tmp_path_factory.mktemp("steady_detect"), small_weights)


def _detecting(weights, speed: SpeedOptions) -> FacePipeline:
    """A pipeline whose random-valued detector is calibrated to find make_faces' faces, both its
    ways of detecting wrapped to count the images they are given and to find nothing in a plain
    grey image (the calibrated detector finds a face in anything)."""
    gfpgan, detector, parser = load_nets(weights)
    pipe = FacePipeline(gfpgan, detector, parser, device=TEST_DEVICE, dtype=torch.float32, speed=speed)
    pipe.detected = 0
    candidates, centre_rows = pipe.detector.candidates, pipe.detector.centre_rows

    def blank(images):
        return images.flatten(1).std(dim=1) == 0

    def counted(images):
        pipe.detected += images.shape[0]
        found, usable = candidates(images)
        return found, usable & ~blank(images)[found.image]

    def counted_rows(images, image=None):
        pipe.detected += images.shape[0]
        rows = centre_rows(images, image)
        rows.present = rows.present & ~blank(images)
        return rows

    pipe.detector.candidates, pipe.detector.centre_rows = counted, counted_rows
    return pipe


@pytest.fixture(scope="module")
def detecting(detecting_weights):
    """The CPU's way: the faces selected after the waiting detection."""
    return _detecting(detecting_weights, SpeedOptions(paste_mask="box"))


@pytest.fixture(scope="module")
def detecting_wait_free(detecting_weights):
    """CUDA's way: a fixed-size row per image (a placeholder where it has no face) from the
    wait-free detection."""
    return _detecting(detecting_weights, SpeedOptions(paste_mask="box", fixed_selection=True, fixed_detection=True))


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


def _same_video(a: VideoState, b: VideoState) -> bool:
    return (a.frame, a.reused, a.resets, a.held, a.last_face_frame) == \
        (b.frame, b.reused, b.resets, b.held, b.last_face_frame) and np.array_equal(a.points, b.points)


def _gone_and_back() -> np.ndarray:
    face = make_faces(1, seed=3)
    return np.concatenate([np.repeat(face, 4, 0), np.repeat(np.full_like(face, 128), 3, 0), np.repeat(face, 3, 0)])


@pytest.mark.parametrize("every", [1, 2])
def test_wait_free_detection_gives_steady_video_the_waiting_detection_s_frames(detecting, detecting_wait_free, every):
    """CUDA's forms (a fixed-size row per image from the wait-free detection) in steady batches:
    the statuses, the stream's filter and the faces are the waiting detection's exactly, frames
    without a face and frames whose detection is skipped included (a faceless frame's
    placeholder row is dropped in the filter's round trip: the same rows, the same passes)."""
    frames = _gone_and_back()
    want, want_status, _, want_video = run_video(detecting, frames, every=every, per_request=4)
    before = detecting_wait_free.redetected_images
    got, status, detected, video = run_video(detecting_wait_free, frames, every=every, per_request=4)
    assert status == want_status and FaceStatus.NO_FACE in status and FaceStatus.ENHANCED in status
    assert _same_video(video, want_video), (video, want_video)
    assert np.array_equal(got, want)
    assert detecting_wait_free.redetected_images == before


def test_wait_free_detection_keeps_two_streams_and_a_plain_request_in_one_batch_apart(detecting, detecting_wait_free):
    """Two MuseTalk workers' streams and another caller's plain DETECT request in every device
    batch, their rows interleaved (one stream's skipped detection, the other's faceless frame, a
    faceless plain image): each job's faces and statuses, and each stream's filter, are the
    waiting detection's exactly."""
    a_frames = np.repeat(make_faces(1, seed=3), 10, axis=0)  # held: every other frame detected
    b_frames = np.concatenate([make_faces(2, seed=9), np.full_like(make_faces(1, seed=9), 128),
                               np.repeat(make_faces(1, seed=11), 7, 0)])
    plain = np.concatenate([make_faces(3, seed=13), np.full_like(make_faces(1, seed=13), 128)])
    steady_a = EnhanceOptions(steady_video=True, detect_every=2)
    steady_b = EnhanceOptions(steady_video=True)
    results = {}
    for name, pipe in (("waiting", detecting), ("wait-free", detecting_wait_free)):
        va, vb, got = VideoState(), VideoState(), []
        for t in range(0, 10, 5):
            got.append(pipe.enhance([Job(a_frames[t:t + 5], steady_a, video=va),
                                     Job(plain[t % 4:t % 4 + 2], EnhanceOptions()),
                                     Job(b_frames[t:t + 5], steady_b, video=vb)]))
        results[name] = (got, va, vb)
    (want, want_a, want_b), (got, got_a, got_b) = results["waiting"], results["wait-free"]
    assert _same_video(got_a, want_a) and _same_video(got_b, want_b)
    assert got_a.reused > 0 and got_a.frame == got_b.frame == 10
    for batch_got, batch_want in zip(got, want):
        for job_got, job_want in zip(batch_got, batch_want):
            assert job_got.status == job_want.status
            assert np.array_equal(job_got.faces, job_want.faces)
    statuses = [s for batch in got for job in batch for s in job.status]
    assert FaceStatus.NO_FACE in statuses and FaceStatus.ENHANCED in statuses


def test_a_steady_batch_waits_for_the_device_twice_with_wait_free_detection(detecting, detecting_wait_free):
    """The one wait steady video adds (its filter's landmarks) and the results': the detection's
    two and the selection's one are gone (counted by the profiler, as gfpgan-bench --profile
    --steady-video counts them)."""
    from server.profiling import StageProfiler

    frames, options = _gone_and_back(), EnhanceOptions(steady_video=True)
    waits = {}
    for name, pipe in (("waiting", detecting), ("wait-free", detecting_wait_free)):
        video = VideoState()
        pipe.enhance([Job(frames[:4], options, video=video)])
        pipe.profiler = StageProfiler(TEST_DEVICE, count=True)
        try:
            pipe.enhance([Job(frames[4:8], options, video=video)])
            waits[name] = pipe.profiler.totals()[1]
            sources = pipe.profiler.sync_sources()
        finally:
            pipe.profiler = None
    assert waits == {"waiting": 5, "wait-free": 2}, waits
    assert not {"nonzero", "aten::nonzero", "torchvision::nms"} & set(sources), sources


def test_a_steady_image_the_wait_free_detection_cannot_vouch_for_is_detected_again_at_once(
        detecting, detecting_wait_free, monkeypatch):
    """An image whose wait-free detection is not settled (here one round of suppression, where
    the test detector's boxes need more) is detected again the waiting way inside the steady
    batch, before the filter sees it: the stream's frames and filter are the waiting
    detection's, each frame filtered once, and no batch runs again (a redone steady batch would
    filter its frames twice)."""
    from server import detection

    monkeypatch.setattr(detection, "FIXED_NMS_ROUNDS", 1)
    monkeypatch.setattr(FacePipeline, "_detect_again",
                        lambda self, jobs: pytest.fail("a steady batch was run again"))
    rows = detecting_wait_free.detector.centre_rows

    def unsettled_rows_wrong(images, image=None):  # what an unsettled row says is never used
        found = rows(images, image)
        found.landmarks = found.landmarks + 40.0 * (~found.settled).view(-1, 1, 1)
        return found

    monkeypatch.setattr(detecting_wait_free.detector, "centre_rows", unsettled_rows_wrong)
    frames = _gone_and_back()
    want, want_status, _, want_video = run_video(detecting, frames, every=1, per_request=5)
    before = detecting_wait_free.redetected_images
    got, status, _, video = run_video(detecting_wait_free, frames, every=1, per_request=5)
    assert detecting_wait_free.redetected_images - before >= 6  # the 7 frames with a face, at least
    assert status == want_status and _same_video(video, want_video) and video.frame == len(frames)
    assert np.array_equal(got, want)


# --- reuse the paste mask (mask_every) ----------------------------------------------------------

class _StandInParse:
    """In ParseNet's place (which costs seconds a face on these CPUs): a soft template-space mask
    that follows each restored face's own pixels, so that a frame pasted with another frame's
    mask comes out different. Counts the faces it is given and keeps every mask it made;
    `given`, when set, is returned instead (the reference: frames pasted with chosen masks);
    `fail` is raised once, by the next call."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows, self.masks, self.given, self.fail = 0, [], None, None

    def __call__(self, restored: torch.Tensor) -> torch.Tensor:
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        self.rows += restored.shape[0]
        masks = torch.sigmoid((restored.float().mean(1, keepdim=True) - 110.0) / 12.0)
        self.masks += list(masks)
        if self.given is not None:
            masks, self.given = torch.stack(self.given[:restored.shape[0]]), None
        return masks


@pytest.fixture(scope="module")
def masking(small_weights):
    """ParseNet's paste mask (the pipeline's default), its network replaced by _StandInParse."""
    gfpgan, detector, parser = load_nets(small_weights)
    pipe = FacePipeline(gfpgan, detector, parser, device=TEST_DEVICE, dtype=torch.float32,
                        speed=SpeedOptions(paste_mask="parse"))
    parse = _StandInParse()
    pipe._fixed["parse"] = parse
    return pipe, parse


def brightening_video(frames: int, seed: int = 5, jump_at: int | None = None):
    """One face with jittering landmarks, a little brighter every frame (so that each frame's
    mask is its own); from `jump_at` on, the face's landmarks are a cut away."""
    faces, points = jittered_video(frames, seed=seed)
    faces = np.clip(faces.astype(int) + 6 * np.arange(frames).reshape(-1, 1, 1, 1), 0, 255).astype(np.uint8)
    if jump_at is not None:
        eye = float(np.linalg.norm(points[0, 1] - points[0, 0]))
        points[jump_at:, :, 0] += (CUT_EYE_DISTANCES + 0.1) * eye
    return faces, points


def run_masked(pipe, parse, faces, points, every, per_request=3, masks_of=None, fail_at=None):
    """The frames through one stream's state, `per_request` frames a device batch. masks_of:
    frame -> the mask to paste it with (through _StandInParse.given). fail_at: (batch start,
    error): that batch's mask pass raises it once; an out of memory is run again, as the
    batcher does, and another error is left behind, as the batcher fails its requests."""
    options = EnhanceOptions(alignment=Alignment.LANDMARKS, steady_video=True, mask_every=every)
    video, out, status = VideoState(), {}, {}
    for t in range(0, len(faces), per_request):
        part = slice(t, t + per_request)
        if masks_of is not None:
            parse.given = [masks_of(f) for f in range(t, min(t + per_request, len(faces)))]
        if fail_at is not None and fail_at[0] == t:
            parse.fail = fail_at[1]
            try:
                pipe.enhance([Job(faces[part], options, points[part], video=video)])
            except DeviceOutOfMemory:
                pass  # nothing changed: the same batch again
            except RuntimeError:
                continue  # its frames are lost, the stream goes on
        [result] = pipe.enhance([Job(faces[part], options, points[part], video=video)])
        for k, frame in enumerate(range(t, min(t + per_request, len(faces)))):
            out[frame], status[frame] = result.faces[k], result.status[k]
    return out, status, video


def test_mask_every_computes_the_mask_on_every_nth_frame_and_pastes_the_frames_between_with_it(masking):
    """Against the reference: the same pipeline and batches with every mask computed (N = 1),
    each frame pasted with the mask chosen for it. Exact: the same passes, the same masks."""
    pipe, parse = masking
    faces, points = brightening_video(10)
    parse.reset()
    own, _, _ = run_masked(pipe, parse, faces, points, every=1)
    own_masks = parse.masks
    assert parse.rows == 10
    parse.reset()
    reused, status, video = run_masked(pipe, parse, faces, points, every=4)
    # frames 0, 4 and 8 compute theirs; 1-3 take frame 0's (from the batch before, for 3),
    # 5 frame 4's (in its own batch), 6-7 frame 4's again, 9 frame 8's (a batch of no mask of its own)
    assert parse.rows == 3 and video.masks_reused == 7
    assert list(status.values()) == [FaceStatus.ENHANCED] * 10
    source = [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    reference, _, _ = run_masked(pipe, parse, faces, points, every=1, masks_of=lambda f: own_masks[source[f]])
    for frame in range(10):
        assert np.array_equal(reused[frame], reference[frame]), frame
        # frames pasted with another frame's mask come out different, their own are the same
        assert np.array_equal(reused[frame], own[frame]) == (source[frame] == frame), frame
    # The frames that compute are counted on the stream, not in the batch: one frame a batch
    # chooses the same masks (its pixels within the level that another network batch size may
    # round by on these CPUs, as in the test of two videos above).
    parse.reset()
    alone, _, video_alone = run_masked(pipe, parse, faces, points, every=4, per_request=1)
    assert parse.rows == 3 and video_alone.masks_reused == 7
    for frame in range(10):
        assert np.abs(alone[frame].astype(int) - reused[frame]).max() <= 1, frame


def test_a_cut_computes_the_mask_afresh(masking):
    pipe, parse = masking
    for jump_at, rows, reused in ((None, 2, 4), (3, 3, 3)):
        faces, points = brightening_video(6, seed=6, jump_at=jump_at)
        parse.reset()
        _, status, video = run_masked(pipe, parse, faces, points, every=4, per_request=6)
        # frames 0 and 4; with a cut at 3, frame 3 too (the face before it is another face)
        assert (parse.rows, video.masks_reused, video.resets) == (rows, reused, int(jump_at is not None))
        assert list(status.values()) == [FaceStatus.ENHANCED] * 6


def test_a_batch_that_ran_out_of_memory_runs_again_to_the_same_frames(masking):
    """The batch that makes frame 4's mask runs out of memory in the mask pass and runs again:
    its stream's mask and counts went back to where they were, and every frame comes out as if
    it had not happened."""
    pipe, parse = masking
    faces, points = brightening_video(10)
    plain, _, plain_video = run_masked(pipe, parse, faces, points, every=4)
    again, _, video = run_masked(pipe, parse, faces, points, every=4,
                                 fail_at=(3, torch.OutOfMemoryError("CUDA out of memory (test)")))
    assert video.masks_reused == plain_video.masks_reused == 7
    assert all(np.array_equal(again[f], plain[f]) for f in range(10))


def test_frames_whose_mask_was_lost_with_a_failed_batch_compute_their_own(masking):
    """The batch that was to make frame 4's mask fails (frames 3-5 lost to their callers): frames
    6 and 7 compute their own masks, not counted as reused, and frame 8 makes the next one."""
    pipe, parse = masking
    faces, points = brightening_video(10)
    own, _, _ = run_masked(pipe, parse, faces, points, every=1)
    parse.reset()
    out, status, video = run_masked(pipe, parse, faces, points, every=4, fail_at=(3, RuntimeError("boom")))
    assert sorted(out) == [0, 1, 2, 6, 7, 8, 9]
    assert parse.rows == 1 + 3 + 0  # frame 0; frames 6, 7 and 8; frame 9 takes frame 8's
    assert video.masks_reused == 2 + 1  # frames 1-2 and 9
    assert all(np.array_equal(out[f], own[f]) for f in (0, 6, 7, 8))
    assert list(status.values()) == [FaceStatus.ENHANCED] * 7


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


class _ReusingMasks(FakePipeline):
    """Says it pasted every steady frame with an earlier frame's mask (VideoState.masks_reused),
    as the pipeline does with mask_every."""

    def enhance(self, jobs):
        for job in jobs:
            if job.video is not None:
                job.video.masks_reused += job.faces.shape[0]
        return super().enhance(jobs)


async def test_the_service_counts_the_frames_pasted_with_an_earlier_frames_mask():
    pipeline = _ReusingMasks()
    steady = EnhanceOptions(output_size=256, steady_video=True, mask_every=4)
    async with running(pipeline) as app, channel(app) as ch:
        call = pb_grpc.FaceEnhancerStub(ch).EnhanceBatch()
        for k in range(3):
            await call.write(codec.encode_request(k, frames(3 * k, 3), steady))
        await call.write(codec.encode_request(3, frames(9, 2), EnhanceOptions(output_size=256)))
        await call.done_writing()
        answers = [r async for r in call]
        counted = app.metrics.registry.get_sample_value("faceenhance_reused_masks_total")
    assert [r.request_id for r in answers] == [0, 1, 2, 3] and not any(r.HasField("error") for r in answers)
    assert counted == 9  # each steady frame once; the plain request's frames carry no state


def test_wait_free_detection_reuses_the_paste_mask_as_the_waiting_detection_does(detecting_weights):
    """mask_every with DETECT and CUDA's forms: a frame without a face is a placeholder row
    there, which steady video drops (its host round trip knows it): no mask computed for it,
    none taken, none counted as reused. The masks computed, the masks reused, the statuses, the
    filter and the faces are the waiting detection's, exactly."""
    face = make_faces(1, seed=3)
    frames = np.concatenate([np.repeat(face, 3, 0), np.repeat(np.full_like(face, 128), 2, 0), np.repeat(face, 4, 0)])
    options = EnhanceOptions(steady_video=True, mask_every=3)
    runs = {}
    for name, fixed in (("waiting", False), ("wait-free", True)):
        pipe = _detecting(detecting_weights, SpeedOptions(paste_mask="parse", fixed_selection=fixed,
                                                          fixed_detection=fixed))
        parse = pipe._fixed["parse"] = _StandInParse()
        video, out, status = VideoState(), [], []
        for t in range(0, len(frames), 4):
            [result] = pipe.enhance([Job(frames[t:t + 4], options, video=video)])
            out.append(result.faces)
            status += result.status
        runs[name] = (np.concatenate(out), status, video, parse.rows)
    (want, want_status, want_video, _), (got, status, video, rows) = runs["waiting"], runs["wait-free"]
    assert status == want_status and FaceStatus.NO_FACE in status
    assert _same_video(video, want_video) and video.masks_reused == want_video.masks_reused > 0
    assert np.array_equal(got, want) and rows == runs["waiting"][3] == 3

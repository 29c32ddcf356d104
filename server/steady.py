"""Steady video: one stream's face alignment smoothed over time, before the warp.

Every frame is detected on its own, so the 5 landmarks wander by a pixel or two on a face that
hardly moves, and the crop GFPGAN sees jumps with them: lips and teeth shimmer. A stream of
`steady_video` requests is one video in frame order, so its landmarks are filtered here.

The filter is a One-Euro filter (Casiez, Roussel and Vogel, CHI 2012), chosen because it is
built for exactly this trade: a low cutoff while the face is still (the jitter is removed) and
a cutoff that rises with the face's speed (a moving face is followed without visible lag). An
average over a window (Wav2Lip's 5 boxes) lags a moving face by half its window at every speed;
an exponential filter has one fixed trade-off. The whole face shares one cutoff, set by the
speed of the face as a whole, so the 5 points move together and the face keeps its shape.
Positions are in units of the face's eye distance, so one set of parameters fits every size.

- A cut (since the last frame the face jumps by more than CUT_EYE_DISTANCES, changes size by
  more than CUT_SCALE or turns by more than CUT_DEGREES: more than a face moves between two
  frames, as when another face takes its place) or a face lost for more than MAX_GAP_FRAMES
  frames starts the filter afresh from the new face.
- Raw landmarks within DEADBAND_EYE_DISTANCES (mean over the 5 points) of the current output
  leave it where it is: a still face whose detections wobble by a fraction of a pixel gets
  exactly the same alignment frame after frame (at most that far from where it would settle).
- Only frames with exactly one face are smoothed (`only_center_face` on, the default); with
  several faces per frame they are left as detected and the state is left alone.
- Skip detection (`detect_every` N > 1, for crops that are already stable, like MuseTalk's one
  box per video): while the filter holds a face, only every N-th frame of the stream is
  detected and the frames between are warped with the filter's current alignment. A detected
  frame without exactly one face drops the hold, and from then on every frame is detected until
  one face is found again, so a face that has gone is never restored where it was for longer
  than the frames already planned in that device batch.
- Reuse the paste mask (`mask_every` N > 1): the mask of the frame it was last computed on
  (`mask`, in template space, so it moves with each frame's own alignment) pastes the frames
  after it until the stream's next N-th frame. A cut, a lost face or a frame with several faces
  drops it, and the next frame computes its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

#: Frames per second the cutoffs are stated for (MuseTalk's default).
RATE_HZ = 25.0
#: The cutoff of a still face, and how fast it rises with the face's speed (eye distances/s).
MIN_CUTOFF_HZ = 0.8
BETA = 8.0
#: The cutoff of the speed estimate itself.
SPEED_CUTOFF_HZ = 1.0
#: A jump of more than this (mean over the 5 points, in eye distances) is a cut.
CUT_EYE_DISTANCES = 0.35
#: ... or a change of size (eye distance) by more than this fraction, or of roll by more than
#: this many degrees, between two frames.
CUT_SCALE = 0.08
CUT_DEGREES = 6.0
#: A face missing for more than this many frames is a new face when it comes back.
MAX_GAP_FRAMES = 5
#: Raw landmarks this close to the output (mean, eye distances; 0.6 px at 60 px) do not move it.
DEADBAND_EYE_DISTANCES = 0.01


def _alpha(cutoff_hz: float) -> float:
    tau = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau * RATE_HZ)


@dataclass
class VideoState:
    """One video's alignment filter: the service keeps one per EnhanceBatch stream (and one per
    unary request), frees it with the stream, and it holds a few numbers only."""

    frame: int = 0              # frames seen so far (with a face or not)
    last_face_frame: int = -10**9
    points: np.ndarray | None = None      # (5, 2) the last output, in pixels
    speed: float = 0.0          # smoothed speed of the face, eye distances per second
    resets: int = 0             # cuts and returns after a gap (for tests and metrics)
    held: bool = False          # the last detected frame had one face: its alignment may be reused
    reused: int = 0             # frames warped with the held alignment, not detected
    reported: int = 0           # of those, counted in the service's metrics so far
    #: (frame, mask): the paste mask of the last frame it was computed on (mask_every), as the
    #: pipeline made it (a device tensor, opaque here); None after a cut or a lost face
    mask: tuple[int, object] | None = None
    masks_reused: int = 0       # frames pasted with an earlier frame's mask (counted by the pipeline)
    masks_reported: int = 0     # of those, counted in the service's metrics so far

    def snapshot(self) -> "VideoState":
        """A copy of the filter, for `restore` when the batch it is used in fails and runs again."""
        return dataclasses.replace(self)

    def restore(self, snapshot: "VideoState") -> None:
        """The filter as it was at `snapshot`. `reported` and `masks_reported` stay: the service
        writes them, and what it counted was reported."""
        for field in dataclasses.fields(self):
            if field.name not in ("reported", "masks_reported"):
                setattr(self, field.name, getattr(snapshot, field.name))

    def skip(self) -> None:
        """A frame with no face (or several): counted, nothing smoothed, nothing held."""
        self.frame += 1
        self.held = False
        self.mask = None

    def plan(self, count: int, every: int, planned: int = 0) -> list[bool]:
        """Which of the next `count` frames (after `planned` frames already planned in this
        device batch) to detect: all while no face is held, else every `every`-th frame of the
        stream. Frames not detected take `hold()`."""
        if every <= 1 or not self.held:
            return [True] * count
        first = self.frame + planned
        return [(first + k) % every == 0 for k in range(count)]

    def hold(self) -> np.ndarray | None:
        """A frame whose detection was skipped: the current alignment, or None when the frames
        detected before it in the batch lost the face (the frame then has no face)."""
        self.frame += 1
        if not self.held or self.points is None:
            self.mask = None
            return None
        self.last_face_frame = self.frame - 1
        self.reused += 1
        return self.points.astype(np.float32)

    def reuses_mask(self, every: int) -> bool:
        """Whether the frame smooth() or hold() just took pastes with `mask` (the one of an
        earlier frame) instead of its own: with `every` > 1, while a mask is held and this is not
        one of the stream's every-th frames. The pipeline counts it in `masks_reused` once the
        frame is pasted."""
        frame = self.frame - 1
        return not (every <= 1 or self.mask is None or frame % every == 0 or frame - self.mask[0] >= every)

    def smooth(self, raw: np.ndarray) -> np.ndarray:
        """The filtered (5, 2) landmarks for this frame's raw ones (pixels)."""
        raw = np.asarray(raw, dtype=np.float64).reshape(5, 2)
        frame, self.frame = self.frame, self.frame + 1
        eye = float(np.linalg.norm(raw[1] - raw[0]))
        if eye <= 0 or not np.isfinite(raw).all():
            self.held = False
            self.mask = None
            return raw.astype(np.float32)
        if self.points is not None:
            jump = float(np.linalg.norm(raw - self.points, axis=1).mean()) / eye
            # size and roll change from all 5 points (a least-squares similarity), steadier
            # than from the two eyes alone
            then, now = self.points - self.points.mean(0), raw - raw.mean(0)
            norm = float((then * then).sum()) or 1e-9
            a = float((then * now).sum()) / norm
            b = float((then[:, 0] * now[:, 1] - then[:, 1] * now[:, 0]).sum()) / norm
            scale = abs(math.log(max(math.hypot(a, b), 1e-9)))
            turn = abs(math.degrees(math.atan2(b, a)))
            gap = frame - self.last_face_frame
            if (jump > CUT_EYE_DISTANCES or scale > math.log1p(CUT_SCALE) or turn > CUT_DEGREES
                    or gap > MAX_GAP_FRAMES + 1):
                self.points = None
                self.mask = None
                self.resets += 1
        self.last_face_frame = frame
        self.held = True
        if self.points is None:
            self.mask = None  # a new face (or the first): its own mask
            self.points, self.speed = raw.copy(), 0.0
            return raw.astype(np.float32)
        previous = self.points
        a_speed = _alpha(SPEED_CUTOFF_HZ)
        if float(np.linalg.norm(raw - previous, axis=1).mean()) / eye < DEADBAND_EYE_DISTANCES:
            self.speed *= 1 - a_speed  # still: the speed estimate decays
            return previous.astype(np.float32)
        # speed of the face as a whole (mean point velocity), eye distances per second
        velocity = (raw - previous).mean(axis=0) * RATE_HZ / eye
        self.speed = a_speed * float(np.linalg.norm(velocity)) + (1 - a_speed) * self.speed
        a = _alpha(MIN_CUTOFF_HZ + BETA * self.speed)
        filtered = a * raw + (1 - a) * previous
        self.points = filtered
        return filtered.astype(np.float32)

"""The domain vocabulary shared by the client and the service: options, statuses, results.

Plain Python and numpy only, so that both sides (and the MuseTalk adapter) can import it
without torch. The protobuf messages are converted to and from these in `client.codec`.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

OUTPUT_SIZES = (256, 512, 1024)
DEFAULT_OUTPUT_SIZE = 256
#: 5-point landmarks per face: left eye, right eye, nose, left mouth corner, right mouth corner.
NUM_LANDMARKS = 5


class Alignment(enum.Enum):
    """How the face is found inside each image (see proto/faceenhance/v1/face_enhance.proto)."""

    DETECT = "detect"
    ALIGNED = "aligned"
    LANDMARKS = "landmarks"


class FaceStatus(enum.IntEnum):
    """What happened to one face; the numbers are the protobuf enum's."""

    ENHANCED = 1
    NO_FACE = 2
    FALLBACK = 3


class InvalidRequest(ValueError):
    """A request the caller got wrong; the message says what and how to fix it."""


@dataclass(frozen=True)
class EnhanceOptions:
    """Per-request options; the defaults are the contract's defaults."""

    output_size: int = DEFAULT_OUTPUT_SIZE
    alignment: Alignment = Alignment.DETECT
    fidelity: float = 0.0
    only_center_face: bool = True
    random_noise: bool = False

    def validate(self) -> "EnhanceOptions":
        if self.output_size not in OUTPUT_SIZES:
            raise InvalidRequest(
                f"output_size must be one of {', '.join(map(str, OUTPUT_SIZES))}; got {self.output_size}")
        if not isinstance(self.alignment, Alignment):
            raise InvalidRequest(f"alignment must be an Alignment; got {self.alignment!r}")
        if not (isinstance(self.fidelity, (int, float)) and math.isfinite(self.fidelity)
                and 0.0 <= self.fidelity <= 1.0):
            raise InvalidRequest(f"fidelity must be a number in [0, 1]; got {self.fidelity!r}")
        return self


@dataclass
class EnhanceResult:
    """Enhanced faces for one request, in request order."""

    faces: np.ndarray  # (N, output_size, output_size, 3) uint8 BGR
    status: list[FaceStatus]
    #: True when the client resized locally instead of getting an answer from the service.
    fell_back: bool = False
    #: Why the client fell back ("timeout", "unavailable", ...); None when it did not.
    fallback_reason: str | None = None
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RequestLimits:
    """What the service accepts in one request (reported by GetInfo)."""

    max_faces_per_request: int = 32
    min_face_size: int = 64
    max_face_size: int = 512

    def max_request_bytes(self) -> int:
        """Largest valid EnhanceRequest on the wire, with room for landmarks and framing."""
        return self.max_faces_per_request * self.max_face_size ** 2 * 3 + 64 * 1024

    def max_response_bytes(self) -> int:
        """Largest valid EnhanceResponse on the wire."""
        return self.max_faces_per_request * max(OUTPUT_SIZES) ** 2 * 3 + 64 * 1024

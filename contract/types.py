"""The domain vocabulary shared by the client and the service: options, statuses, results.

Plain Python and numpy only, so that both sides (and the MuseTalk adapter) can import it
without torch. The protobuf messages are converted to and from these in `contract.codec`.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

import numpy as np

OUTPUT_SIZES = (256, 512, 1024)
DEFAULT_OUTPUT_SIZE = 256
#: Steady video's skip detection: detect at most every this many frames.
MAX_DETECT_EVERY = 100
#: Steady video's reused paste mask: compute it at most every this many frames.
MAX_MASK_EVERY = 100
#: 5-point landmarks per face: left eye, right eye, nose, left mouth corner, right mouth corner.
NUM_LANDMARKS = 5


class Alignment(enum.Enum):
    """How the face is found inside each image (see proto/faceenhance/v1/face_enhance.proto)."""

    DETECT = "detect"
    ALIGNED = "aligned"
    LANDMARKS = "landmarks"


class Background(enum.Enum):
    """What fills the output around the pasted face when it is larger than the input."""

    LANCZOS = "lanczos"
    REALESRGAN = "realesrgan"


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
    #: Consecutive frames of one video: alignment smoothed over time, per stream (see the proto).
    steady_video: bool = False
    #: Steady video, DETECT: detect every N-th frame, reuse the smoothed alignment between.
    detect_every: int = 1
    #: Which loaded restorer (ServiceInfo.models' ids); "" is the service's default.
    model: str = ""
    #: Lanczos, or Real-ESRGAN where the service has one loaded (DETECT and LANDMARKS).
    background: Background = Background.LANCZOS
    #: The restorer's own fidelity weight (CodeFormer's w, 0..1; None: its default, 0.5).
    fidelity_weight: float | None = None
    #: Steady video, DETECT or LANDMARKS: compute the paste mask every N-th frame, reuse it between.
    mask_every: int = 1

    def validate(self) -> "EnhanceOptions":
        if self.output_size not in OUTPUT_SIZES:
            raise InvalidRequest(
                f"output_size must be one of {', '.join(map(str, OUTPUT_SIZES))}; got {self.output_size}")
        if not isinstance(self.alignment, Alignment):
            raise InvalidRequest(f"alignment must be an Alignment; got {self.alignment!r}")
        if not (isinstance(self.fidelity, (int, float)) and math.isfinite(self.fidelity)
                and 0.0 <= self.fidelity <= 1.0):
            raise InvalidRequest(f"fidelity must be a number in [0, 1]; got {self.fidelity!r}")
        _check_every(self.detect_every, "detect_every", MAX_DETECT_EVERY)
        _check_every(self.mask_every, "mask_every", MAX_MASK_EVERY)
        if not isinstance(self.model, str) or not _MODEL_ID.fullmatch(self.model):
            raise InvalidRequest(f"model must be a restorer id like 'gfpgan-1.4' or 'restoreformer' "
                                 f"(letters, digits, '.', '_', '-'; at most 64), or empty for the "
                                 f"service's default; got {self.model!r}")
        if self.fidelity_weight is not None and not (
                isinstance(self.fidelity_weight, (int, float)) and not isinstance(self.fidelity_weight, bool)
                and math.isfinite(self.fidelity_weight) and 0.0 <= self.fidelity_weight <= 1.0):
            raise InvalidRequest(f"fidelity_weight must be a number in [0, 1] (CodeFormer's w), or unset; "
                                 f"got {self.fidelity_weight!r}")
        if not isinstance(self.background, Background):
            raise InvalidRequest(f"background must be a Background; got {self.background!r}")
        if self.background is Background.REALESRGAN and self.alignment is Alignment.ALIGNED:
            raise InvalidRequest("background realesrgan upsamples the picture around the face; "
                                 "ALIGNED returns the face alone: use DETECT or LANDMARKS")
        if self.detect_every > 1 and not (self.steady_video and self.alignment is Alignment.DETECT):
            raise InvalidRequest(
                f"detect_every={self.detect_every} reuses a video's smoothed alignment between "
                "detections: it needs steady_video and alignment DETECT")
        if self.mask_every > 1 and not (self.steady_video and self.alignment is not Alignment.ALIGNED):
            raise InvalidRequest(
                f"mask_every={self.mask_every} reuses a video's paste mask between frames: it needs "
                "steady_video and alignment DETECT or LANDMARKS (ALIGNED pastes nothing)")
        return self


def _check_every(value, name: str, maximum: int) -> None:
    """A steady-video "every N-th frame" option: a whole number in 1..maximum."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidRequest(f"{name} must be a whole number in 1..{maximum} (1: every frame); got {value!r}")


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


#: What a restorer id may look like ("" is the default model).
_MODEL_ID = re.compile(r"[A-Za-z0-9._-]{0,64}")


@dataclass(frozen=True)
class RestorerInfo:
    """One restorer a service has loaded (GetInfo's `models`), as a request names it."""

    id: str
    name: str
    version: str
    arch: str
    weights_sha256: str = ""
    model_file: str = ""
    channel_multiplier: int = 0
    licence: str = ""
    native_size: int = 512
    #: EnhanceOptions.random_noise means something (GFPGAN's StyleGAN2 noise).
    random_noise: bool = True
    #: The network takes a fidelity weight of its own (CodeFormer's w).
    fidelity_weight: bool = False

    @property
    def model_name(self) -> str:  # the ServiceInfo spelling, for ModelSpec and describe_model
        return self.name


#: GFPGANer's names for its architectures (its `arch` argument), the words callers configure.
ARCHS = ("clean", "original", "bilinear", "RestoreFormer")


@dataclass(frozen=True)
class ModelSpec:
    """The model a caller asks for, in the words of GFPGANer and of the integration plan
    (`model_path`, `arch`, `channel_multiplier`); None asks nothing. Checked against what a
    service reports (GetInfo): the caller's file is named, not sent, so only its file name
    counts, plus its SHA-256 where the caller has the file."""

    model_path: str | None = None
    arch: str | None = None
    channel_multiplier: int | None = None
    sha256: str | None = None
    #: A restorer id ("restoreformer"), as ServiceInfo.models lists them.
    model: str | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.model_path, self.arch, self.channel_multiplier,
                                            self.sha256, self.model))

    @property
    def file_name(self) -> str | None:
        """"GFPGANv1.4.pth" from a POSIX or a Windows path alike."""
        if self.model_path is None:
            return None
        return re.split(r"[\\/]", str(self.model_path).strip())[-1]

    def validate(self) -> "ModelSpec":
        if self.arch is not None and self.arch.lower() not in {a.lower() for a in ARCHS}:
            raise InvalidRequest(f"arch must be one of {', '.join(ARCHS)} (GFPGANer's names); "
                                 f"got {self.arch!r}")
        if self.channel_multiplier is not None and (
                isinstance(self.channel_multiplier, bool) or not isinstance(self.channel_multiplier, int)
                or self.channel_multiplier < 1):
            raise InvalidRequest(f"channel_multiplier must be a whole number of 1 or more; "
                                 f"got {self.channel_multiplier!r}")
        if self.model_path is not None and not self.file_name:
            raise InvalidRequest(f"model_path must name a file; got {self.model_path!r}")
        if self.model is not None and not (isinstance(self.model, str) and _MODEL_ID.fullmatch(self.model)):
            raise InvalidRequest(f"model must be a restorer id like 'gfpgan-1.4'; got {self.model!r}")
        return self

    def choose(self, info) -> str | None:
        """The id of the first restorer `info` (a client.ServiceInfo) lists that fits this spec,
        "" for a service that lists none but fits as a whole, None when nothing fits."""
        models = getattr(info, "models", ())
        if not models:
            return "" if not self._differences(info, None) else None
        return next((m.id for m in models if not self._differences(m, m.id)), None)

    def mismatches(self, info) -> list[str]:
        """What in `info` (a client.ServiceInfo) differs from this spec; [] when it is served
        (by any of its restorers). A value the service does not report counts as a difference:
        nothing is assumed."""
        models = getattr(info, "models", ())
        if not models:
            return self._differences(info, None)
        if self.choose(info) is not None:
            return []
        loaded = "; ".join(f"{m.id}: {describe_model(m)}" for m in models)
        return [f"no restorer the service has loaded fits {self.describe()} (loaded: {loaded})"]

    def describe(self) -> str:
        return ", ".join(f"{key} {value}" for key, value in (
            ("model", self.model), ("model_path", self.file_name), ("arch", self.arch),
            ("channel_multiplier", self.channel_multiplier),
            ("sha256", self.sha256 and self.sha256[:12] + "...")) if value is not None)

    def _differences(self, info, model_id: str | None) -> list[str]:
        served = describe_model(info)
        problems = []
        name = self.file_name
        if name is not None:
            stem = name.rsplit(".", 1)[0] if "." in name else name
            known = {info.model_file.lower(), info.model_name.lower()} - {""}
            if name.lower() not in known and stem.lower() not in known:
                problems.append(f"model_path names {name}, but the service serves {served}")
        if self.sha256 is not None and self.sha256.lower() != info.weights_sha256.lower():
            problems.append(f"the local {name or 'model file'} has SHA-256 {self.sha256[:12]}..., "
                            f"the service's checkpoint {info.weights_sha256[:12] or 'none'}...: "
                            f"they are different files")
        if self.arch is not None and self.arch.lower() != info.arch.lower():
            problems.append(f"arch is {self.arch!r}, but the service serves {served}")
        if self.channel_multiplier is not None and self.channel_multiplier != info.channel_multiplier:
            problems.append(f"channel_multiplier is {self.channel_multiplier}, but the service "
                            f"serves {served}")
        if self.model is not None and self.model != model_id:
            problems.append(f"model is {self.model!r}, but the service serves {served}"
                            + ("" if model_id is not None else " and lists no restorer ids"))
        return problems


def describe_model(info) -> str:
    """'GFPGANv1.4 (GFPGANv1.4.pth, arch clean, channel_multiplier 2)' from a ServiceInfo or
    one of its RestorerInfo."""
    arch = info.arch or "not reported"
    multiplier = info.channel_multiplier or ("none" if arch == "RestoreFormer" else "not reported")
    return (f"{info.model_name or '?'} ({info.model_file or 'file not reported'}, arch {arch}, "
            f"channel_multiplier {multiplier})")

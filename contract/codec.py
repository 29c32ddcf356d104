"""Conversions between protobuf messages and numpy arrays / domain types, with validation.

The request path is zero-copy on the receiving side: `decode_faces` returns a read-only
view on the message's bytes. Every check raises `InvalidRequest` with a message that says
what was wrong, so the service can send it back as is.
"""
from __future__ import annotations

import math

import numpy as np

from contract.pb import face_enhance_pb2 as pb
from contract.types import (
    NUM_LANDMARKS,
    Alignment,
    Background,
    EnhanceOptions,
    EnhanceResult,
    RestorerInfo,
    FaceStatus,
    InvalidRequest,
    RequestLimits,
    DEFAULT_OUTPUT_SIZE,
)

_ALIGNMENT_TO_PB = {
    Alignment.DETECT: pb.ALIGNMENT_DETECT,
    Alignment.ALIGNED: pb.ALIGNMENT_ALIGNED,
    Alignment.LANDMARKS: pb.ALIGNMENT_LANDMARKS,
}
_ALIGNMENT_FROM_PB = {v: k for k, v in _ALIGNMENT_TO_PB.items()}
_BACKGROUND_TO_PB = {Background.LANCZOS: pb.BACKGROUND_LANCZOS, Background.REALESRGAN: pb.BACKGROUND_REALESRGAN}
_BACKGROUND_FROM_PB = {v: k for k, v in _BACKGROUND_TO_PB.items()}


#: The smallest eye-to-eye and eyes-to-mouth distance of caller-given landmarks, in pixels.
MIN_LANDMARK_SPAN_PX = 4

def as_face_array(faces) -> np.ndarray:
    """Check a caller's faces: (N, H, W, 3) uint8, any strides (MuseTalk's are negative)."""
    faces = np.asarray(faces)
    if faces.ndim == 3:
        faces = faces[None]
    if faces.ndim != 4 or faces.shape[-1] != 3:
        raise InvalidRequest(f"faces must have shape (N, H, W, 3); got {faces.shape}")
    if faces.dtype != np.uint8:
        raise InvalidRequest(f"faces must be uint8 BGR; got dtype {faces.dtype}")
    if faces.shape[0] == 0:
        raise InvalidRequest("faces is empty: send at least one face")
    return faces


def encode_faces(faces: np.ndarray) -> pb.FaceBatch:
    """(N, H, W, 3) uint8 in any memory layout -> FaceBatch (one copy, into the bytes)."""
    faces = as_face_array(faces)
    n, h, w, c = faces.shape
    return pb.FaceBatch(count=n, height=h, width=w, channels=c,
                        data=np.ascontiguousarray(faces).tobytes())


def decode_faces(batch: pb.FaceBatch, limits: RequestLimits | None = None) -> np.ndarray:
    """FaceBatch -> read-only (N, H, W, 3) uint8 view on its bytes, after checking it."""
    n, h, w, c = batch.count, batch.height, batch.width, batch.channels
    if n == 0:
        raise InvalidRequest("faces.count is 0: send at least one face")
    if c != 3:
        raise InvalidRequest(f"faces.channels must be 3 (BGR); got {c}")
    if h == 0 or w == 0:
        raise InvalidRequest(f"faces.height and faces.width must be set; got {h}x{w}")
    expected = n * h * w * c
    if len(batch.data) != expected:
        raise InvalidRequest(
            f"faces.data has {len(batch.data)} bytes but count*height*width*channels = "
            f"{n}*{h}*{w}*{c} = {expected}")
    if limits is not None:
        if n > limits.max_faces_per_request:
            raise InvalidRequest(
                f"too many faces in one request: {n} > {limits.max_faces_per_request}; "
                "split the batch")
        if h != w:
            raise InvalidRequest(f"faces must be square (height == width); got {h}x{w}")
        if not limits.min_face_size <= h <= limits.max_face_size:
            raise InvalidRequest(
                f"face size {h}x{w} is outside the accepted range "
                f"{limits.min_face_size}..{limits.max_face_size} pixels")
    return np.frombuffer(batch.data, dtype=np.uint8).reshape(n, h, w, c)


def encode_options(options: EnhanceOptions) -> pb.EnhanceOptions:
    return pb.EnhanceOptions(
        output_size=options.output_size,
        alignment=_ALIGNMENT_TO_PB[options.alignment],
        fidelity=options.fidelity,
        only_center_face=options.only_center_face,
        random_noise=options.random_noise,
        steady_video=options.steady_video,
        detect_every=options.detect_every if options.detect_every > 1 else 0,
        model=options.model,
        background=_BACKGROUND_TO_PB[options.background],
        fidelity_weight=options.fidelity_weight,
        mask_every=options.mask_every if options.mask_every > 1 else 0,
    )


def decode_options(msg: pb.EnhanceOptions) -> EnhanceOptions:
    """Options message -> validated EnhanceOptions, applying the contract's defaults."""
    if msg.alignment not in _ALIGNMENT_FROM_PB:
        raise InvalidRequest(
            f"unknown alignment value {msg.alignment}; use ALIGNMENT_DETECT (0), "
            "ALIGNMENT_ALIGNED (1) or ALIGNMENT_LANDMARKS (2)")
    if msg.background not in _BACKGROUND_FROM_PB:
        raise InvalidRequest(f"unknown background value {msg.background}; use BACKGROUND_LANCZOS (0) "
                             "or BACKGROUND_REALESRGAN (1)")
    return EnhanceOptions(
        output_size=msg.output_size or DEFAULT_OUTPUT_SIZE,
        alignment=_ALIGNMENT_FROM_PB[msg.alignment],
        fidelity=float(msg.fidelity),
        only_center_face=msg.only_center_face if msg.HasField("only_center_face") else True,
        random_noise=msg.random_noise,
        steady_video=msg.steady_video,
        detect_every=msg.detect_every or 1,
        model=msg.model,
        background=_BACKGROUND_FROM_PB[msg.background],
        fidelity_weight=float(msg.fidelity_weight) if msg.HasField("fidelity_weight") else None,
        mask_every=msg.mask_every or 1,
    ).validate()


def encode_restorer(info: RestorerInfo) -> pb.Restorer:
    return pb.Restorer(id=info.id, name=info.name, version=info.version, arch=info.arch,
                       weights_sha256=info.weights_sha256, model_file=info.model_file,
                       channel_multiplier=info.channel_multiplier, licence=info.licence,
                       native_size=info.native_size, random_noise=info.random_noise,
                       fidelity_weight=info.fidelity_weight)


def decode_restorer(msg: pb.Restorer) -> RestorerInfo:
    return RestorerInfo(id=msg.id, name=msg.name, version=msg.version, arch=msg.arch,
                        weights_sha256=msg.weights_sha256, model_file=msg.model_file,
                        channel_multiplier=msg.channel_multiplier, licence=msg.licence,
                        native_size=msg.native_size, random_noise=msg.random_noise,
                        fidelity_weight=msg.fidelity_weight)


def decode_landmarks(values, count: int, alignment: Alignment, image_size: int) -> np.ndarray | None:
    """The request's flat landmark list -> (count, 5, 2) float32, or None when not LANDMARKS."""
    if alignment is not Alignment.LANDMARKS:
        if len(values):
            raise InvalidRequest("landmarks are only accepted with ALIGNMENT_LANDMARKS")
        return None
    expected = count * NUM_LANDMARKS * 2
    if len(values) != expected:
        raise InvalidRequest(
            f"ALIGNMENT_LANDMARKS needs {NUM_LANDMARKS} (x, y) points per face: "
            f"{expected} floats for {count} faces; got {len(values)}")
    points = np.asarray(values, dtype=np.float32).reshape(count, NUM_LANDMARKS, 2)
    if not np.isfinite(points).all():
        raise InvalidRequest("landmarks contain NaN or infinity")
    outside = ((points < 0) | (points > image_size)).any(axis=(1, 2))
    if outside.any():
        bad = int(np.argmax(outside))
        raise InvalidRequest(f"landmarks of face {bad} lie outside its {image_size}x{image_size} "
                             f"image; they are in input pixel coordinates, (x, y) from the top left")
    # A face needs a width (eye to eye) and a height (eyes to mouth) to be aligned: points that
    # coincide or lie on one line have no similarity transform to the template.
    eye_dist = np.linalg.norm(points[:, 1] - points[:, 0], axis=-1)
    height = np.linalg.norm(points[:, 3:].mean(axis=1) - points[:, :2].mean(axis=1), axis=-1)
    small = (eye_dist < MIN_LANDMARK_SPAN_PX) | (height < MIN_LANDMARK_SPAN_PX)
    if small.any():
        bad = int(np.argmax(small))
        raise InvalidRequest(
            f"landmarks of face {bad} span {eye_dist[bad]:.1f} px eye to eye and {height[bad]:.1f} px "
            f"eyes to mouth; each must be at least {MIN_LANDMARK_SPAN_PX} px for the face to be aligned")
    return points


def encode_request(request_id: int, faces: np.ndarray, options: EnhanceOptions,
                   landmarks: np.ndarray | None = None, timeout_ms: float = 0) -> pb.EnhanceRequest:
    req = pb.EnhanceRequest(request_id=request_id, faces=encode_faces(faces),
                            options=encode_options(options),
                            timeout_ms=max(1, math.ceil(timeout_ms)) if timeout_ms > 0 else 0)
    if landmarks is not None:
        req.landmarks.extend(np.asarray(landmarks, dtype=np.float32).reshape(-1).tolist())
    return req


def decode_request(req: pb.EnhanceRequest, limits: RequestLimits):
    """EnhanceRequest -> (faces view, options, landmarks or None); raises InvalidRequest."""
    options = decode_options(req.options)
    faces = decode_faces(req.faces, limits)
    landmarks = decode_landmarks(req.landmarks, faces.shape[0], options.alignment, faces.shape[1])
    return faces, options, landmarks


def encode_response(request_id: int, result: EnhanceResult) -> pb.EnhanceResponse:
    return pb.EnhanceResponse(
        request_id=request_id,
        faces=encode_faces(result.faces),
        face_status=[int(s) for s in result.status],
        timings=pb.Timings(queue_ms=result.queue_ms, compute_ms=result.compute_ms),
    )


def error_response(request_id: int, code: int, message: str) -> pb.EnhanceResponse:
    return pb.EnhanceResponse(request_id=request_id, error=pb.Error(code=int(code), message=message))


def decode_response(resp: pb.EnhanceResponse) -> EnhanceResult:
    """A successful EnhanceResponse -> EnhanceResult (faces as a read-only view)."""
    faces = decode_faces(resp.faces)
    return EnhanceResult(
        faces=faces,
        status=[FaceStatus(s) for s in resp.face_status],
        queue_ms=resp.timings.queue_ms,
        compute_ms=resp.timings.compute_ms,
    )

"""The local answer when the service cannot give one in time: the input faces resized to
the output size with Lanczos, every face marked FALLBACK, so a pipeline never stalls.
"""
from __future__ import annotations

try:
    import cv2
except ImportError as error:  # the client adds no OpenCV of its own (see pyproject.toml)
    raise ImportError("the gfpgan-service client needs OpenCV (cv2): install opencv-python-headless "
                      "(pip install 'gfpgan-service[opencv]') or opencv-python") from error
import numpy as np

from contract.types import EnhanceResult, FaceStatus

#: Why a batch fell back; the values of EnhanceResult.fallback_reason and of the metrics label.
FALLBACK_REASONS = ("timeout", "unavailable", "resource_exhausted", "internal", "transport",
                    "circuit_open", "wrong_model", "unauthenticated")


def resize_faces(faces: np.ndarray, output_size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 in any layout -> (N, output_size, output_size, 3) C-contiguous."""
    out = np.empty((faces.shape[0], output_size, output_size, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        # cv2 wants C-contiguous input; MuseTalk's faces are a negative-stride view.
        out[i] = cv2.resize(np.ascontiguousarray(face), (output_size, output_size),
                            interpolation=cv2.INTER_LANCZOS4)
    return out


def fallback_result(faces: np.ndarray, output_size: int, reason: str, detail: str = "") -> EnhanceResult:
    """The EnhanceResult for faces the service did not enhance, and why (`detail`: the error
    seen, kept in result.extra["fallback_detail"] for logs)."""
    if reason not in FALLBACK_REASONS:
        raise ValueError(f"unknown fallback reason {reason!r}; expected one of {FALLBACK_REASONS}")
    return EnhanceResult(
        faces=resize_faces(faces, output_size),
        status=[FaceStatus.FALLBACK] * faces.shape[0],
        fell_back=True,
        fallback_reason=reason,
        extra={"fallback_detail": detail} if detail else {},
    )

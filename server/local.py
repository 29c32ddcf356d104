"""The service's pipeline in the caller's own process, without gRPC: faces in, results out.

`gfpgan-enhance` without `--address` uses it (client/cli.py), through this one door only.
"""
from __future__ import annotations

import time

import numpy as np

from contract.types import EnhanceOptions, EnhanceResult, InvalidRequest
from server.jobs import Job
from server.model import ModelLoadError
from server.pipeline import build_pipeline
from server.settings import Settings
from server.steady import VideoState
from server.weights import WeightsError


class LocalSetupError(Exception):
    """The pipeline could not be built (missing weights, a bad file, no such device); the
    message says what was wrong and what to do, in one line."""


class LocalEnhancer:
    """One pipeline built as `gfpgan-serve` would build it from the same settings, and the
    steady-video state of one video (every batch with steady_video is its next frames)."""

    def __init__(self, model: str = "", device: str = "auto", dtype: str = "auto",
                 no_download: bool = False, weights_dir: str | None = None):
        values = dict(model=model, device=device, dtype=dtype, no_download=no_download, metrics_port=0)
        if weights_dir:
            values["weights_dir"] = weights_dir
        try:
            self.settings = Settings(**values)
            self.pipeline = build_pipeline(self.settings)
        except (ValueError, RuntimeError, WeightsError, ModelLoadError) as exc:
            raise LocalSetupError(str(exc)) from exc
        self.limits = self.settings.limits()
        self.video = VideoState()

    def enhance(self, faces: np.ndarray, options: EnhanceOptions) -> EnhanceResult:
        """(N, S, S, 3) uint8 BGR faces, S within the service's limits; InvalidRequest otherwise."""
        size = faces.shape[1]
        if not self.limits.min_face_size <= size <= self.limits.max_face_size:
            raise InvalidRequest(f"faces of {size}x{size} are outside the accepted "
                                 f"{self.limits.min_face_size}..{self.limits.max_face_size} pixels; "
                                 "resize them first")
        started = time.perf_counter()
        job = Job(faces, options, video=self.video if options.steady_video else None)
        result = self.pipeline.enhance([job])[0]
        return EnhanceResult(faces=result.faces, status=list(result.status),
                             compute_ms=(time.perf_counter() - started) * 1000.0)

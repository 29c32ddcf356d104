"""The one door between batching and the model: what the batcher hands the pipeline.

Kept free of torch so the transport and the batcher can be imported (and tested) without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from contract.types import EnhanceOptions, FaceStatus, RestorerInfo


@dataclass
class Job:
    """A slice of one request: faces that share options, ready for the device."""

    faces: np.ndarray  # (n, H, W, 3) uint8 BGR, any strides; H == W
    options: EnhanceOptions
    landmarks: np.ndarray | None = None  # (n, 5, 2) float32, input pixels; LANDMARKS only
    #: steady_video: the stream's alignment filter (server.steady.VideoState); its frames
    #: reach the pipeline in frame order, one device thread updates it.
    video: object | None = None


@dataclass
class JobResult:
    faces: np.ndarray  # (n, output_size, output_size, 3) uint8 BGR, C-contiguous
    status: list[FaceStatus]


class DeviceOutOfMemory(Exception):
    """The device ran out of memory on this batch. The pipeline raises it after it has put
    everything back as it was before the batch (no result kept, steady video's filters
    unchanged, the failed pass's memory released), so the same faces may run again, in
    smaller batches. `detail`: what the device said (the allocator's first line)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class ModelInfo:
    """What GetInfo and the model_info metric report about the loaded pipeline."""

    model_name: str
    model_version: str
    weights_sha256: str
    device: str
    dtype: str
    #: The checkpoint's file name ("GFPGANv1.4.pth"), GFPGANer's name for the architecture
    #: ("clean") and the decoder's channel multiplier: what a caller's model settings name.
    model_file: str = ""
    arch: str = ""
    channel_multiplier: int = 0
    #: Every restorer loaded, the default first (empty: only the one above, unnamed), and the
    #: id of the default.
    models: tuple[RestorerInfo, ...] = ()
    default_model: str = ""
    #: The backgrounds requests may ask for ("lanczos", and "realesrgan" when one is loaded).
    backgrounds: tuple[str, ...] = ("lanczos",)

    def restorer(self, model: str) -> RestorerInfo | None:
        """The loaded restorer a request's `model` option names ("" is the default); None when
        there is none by that id. A pipeline that lists no models takes only ""."""
        if not self.models:
            return None if model else RestorerInfo(id="", name=self.model_name,
                                                   version=self.model_version, arch=self.arch)
        wanted = model or self.default_model
        return next((m for m in self.models if m.id == wanted), None)


class Started(Protocol):
    """A batch handed to the device: its work is queued there, its results not read yet."""

    def result(self) -> list[JobResult]:
        """Wait for the device to finish the batch; its JobResults, one per job, in order.
        Raises (never DeviceOutOfMemory: memory is taken while the batch is queued) when the
        device failed on it."""
        ...


class Done:
    """A batch already computed when it was handed over (a pipeline that does not queue)."""

    def __init__(self, results: list[JobResult]):
        self._results = results

    def result(self) -> list[JobResult]:
        return self._results


class Pipeline(Protocol):
    """Runs jobs on the device. Called from one worker thread at a time, never the event loop.

    A pipeline whose device computes asynchronously (CUDA) may also have
    `start(jobs) -> Started`: the same work as enhance() up to the final wait, which
    `Started.result()` does, from another thread. The batcher then queues the next batch on the
    device while this one computes (`--overlap-batches`). `start_batch` calls either kind.
    """

    info: ModelInfo

    def enhance(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Enhance every job's faces in as few device passes as the options allow.

        Returns one JobResult per job, in order. Raises only for device/internal failures;
        requests have been validated before they get here. Raises DeviceOutOfMemory when the
        batch did not fit in the device's memory (a smaller one may).
        """
        ...

    def warmup(self) -> None:
        """Run a representative batch once so the first real request pays no start-up cost."""
        ...


def start_batch(pipeline: Pipeline, jobs: Sequence[Job]) -> Started:
    """`pipeline.start(jobs)` where the pipeline has it; else `enhance(jobs)`, already done.
    Raises what they raise (DeviceOutOfMemory: nothing was queued, nothing changed)."""
    start = getattr(pipeline, "start", None)
    if start is None:
        return Done(pipeline.enhance(jobs))
    return start(jobs)

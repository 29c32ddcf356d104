"""A numpy-only stand-in for the GFPGAN pipeline, for testing batching and transport.

Its "enhancement" is recognisable per face, so tests can check every returned pixel.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from typing import Callable, Sequence

import cv2
import numpy as np

from contract.types import EnhanceOptions, FaceStatus
from server.jobs import DeviceOutOfMemory, Job, JobResult, ModelInfo


def fake_enhanced(faces: np.ndarray, options: EnhanceOptions) -> tuple[np.ndarray, list[FaceStatus]]:
    """What the fake returns: nearest resize to output_size, inverted; all-black faces
    (the fake's "no face found") come back resized but not inverted, marked NO_FACE."""
    size = options.output_size
    out = np.empty((len(faces), size, size, 3), np.uint8)
    status = []
    for i, face in enumerate(faces):
        resized = cv2.resize(np.ascontiguousarray(face), (size, size),
                             interpolation=cv2.INTER_NEAREST)
        if face.any():
            out[i] = 255 - resized
            status.append(FaceStatus.ENHANCED)
        else:
            out[i] = resized
            status.append(FaceStatus.NO_FACE)
    return out, status


class FakePipeline:
    """Implements server.jobs.Pipeline; records every batch it is given.

    delay_s: seconds per batch (the "device" time). hold: when given, every batch waits for
    it to be set (a test decides when the device finishes). fail_if(jobs): raise for the
    batches it picks. out_of_memory_above: batches of more faces raise DeviceOutOfMemory, as
    the pipeline does when the device has no memory for them (a test may change it). warmup_gate: warmup() blocks until it is set. record_faces: keep a copy
    of every face seen (tests look at them; a long soak must not).
    """

    info = ModelInfo(model_name="FakeGFPGAN", model_version="fake (numpy)",
                     weights_sha256="0" * 64, device="cpu", dtype="float32",
                     model_file="FakeGFPGAN.pth", arch="clean", channel_multiplier=2)

    def __init__(self, delay_s: float = 0.0, fail_if: Callable[[Sequence[Job]], bool] | None = None,
                 warmup_gate: threading.Event | None = None, hold: threading.Event | None = None,
                 record_faces: bool = True, out_of_memory_above: int | None = None):
        self.delay_s = delay_s
        self.record_faces = record_faces
        self.hold = hold
        self.fail_if = fail_if
        self.out_of_memory_above = out_of_memory_above
        self.warmup_gate = warmup_gate
        self.warmed_up = False
        self.batches: list[list[tuple[int, EnhanceOptions]]] = []  # per batch: (faces, options)
        self.faces_seen: list[np.ndarray] = []
        self.threads: set[str] = set()
        self.started = threading.Event()  # set when a batch begins (tests wait for "in flight")
        self._lock = threading.Lock()

    def enhance(self, jobs: Sequence[Job]) -> list[JobResult]:
        self._record(jobs)
        if self.hold is not None:
            self.hold.wait(timeout=30)
        if self.delay_s:
            time.sleep(self.delay_s)
        self._refuse(jobs)
        results = []
        for job in jobs:
            faces, status = fake_enhanced(job.faces, job.options)
            results.append(JobResult(faces=faces, status=status))
        return results

    def _record(self, jobs: Sequence[Job]) -> int:
        """Note the batch (its faces, options, thread) and say it began; its number, from 0."""
        with self._lock:
            self.batches.append([(job.faces.shape[0], job.options) for job in jobs])
            if self.record_faces:
                self.faces_seen.extend(np.array(face) for job in jobs for face in job.faces)
            self.threads.add(threading.current_thread().name)
            number = len(self.batches) - 1
        self.started.set()
        return number

    def _refuse(self, jobs: Sequence[Job]) -> None:
        """Raise what fail_if and out_of_memory_above ask of this batch."""
        if self.fail_if is not None and self.fail_if(jobs):
            raise RuntimeError("fake device failure")
        faces = sum(job.faces.shape[0] for job in jobs)
        if self.out_of_memory_above is not None and faces > self.out_of_memory_above:
            raise DeviceOutOfMemory(f"the device ran out of memory on a batch of {faces} faces "
                                    "(fake: CUDA out of memory)")

    def warmup(self) -> None:
        if self.warmup_gate is not None:
            self.warmup_gate.wait(timeout=30)
        self.warmed_up = True

    @property
    def batch_sizes(self) -> list[int]:
        return [sum(n for n, _ in batch) for batch in self.batches]

    @property
    def faces_total(self) -> int:
        return sum(self.batch_sizes)

    def factory(self, settings=None) -> "FakePipeline":
        """A pipeline_factory for serve()/FaceEnhanceServer that hands out this instance."""
        return self


class QueuedFakePipeline(FakePipeline):
    """FakePipeline with `start` (server/jobs.py): a batch is queued on a fake device, a thread
    of its own that finishes batches one at a time in the order they came, as CUDA runs the
    kernels a pipeline queued; the handle's result() waits for it.

    `events`: ("start", n) when batch n was queued (on the batcher's device thread), ("done", n)
    when the fake device finished it, ("result", n) when its results were read; n is the batch's
    index in `batches`. gated: batch n's device work waits until `release(n)`. face_s: the
    device's seconds a face, beside FakePipeline's delay_s a batch.
    fail_result_if(n): the wait for batch n fails (a device error seen at the wait). The
    checks enhance() makes (fail_if, out_of_memory_above) happen when a batch is queued.
    """

    def __init__(self, gated: bool = False, fail_result_if: Callable[[int], bool] | None = None,
                 face_s: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.gated = gated
        self.face_s = face_s  # the fake device's seconds a face (beside delay_s a batch)
        self.fail_result_if = fail_result_if
        self.events: list[tuple[str, int]] = []
        self._gates: dict[int, threading.Event] = defaultdict(threading.Event)
        self._queued: queue.Queue = queue.Queue()
        threading.Thread(target=self._device, name="fake-device", daemon=True).start()

    def enhance(self, jobs: Sequence[Job]) -> list[JobResult]:
        return self.start(jobs).result()

    def start(self, jobs: Sequence[Job]) -> "_FakeQueued":
        number = self._record(jobs)
        with self._lock:
            self.events.append(("start", number))
        self._refuse(jobs)
        handle = _FakeQueued(self, number, list(jobs))
        self._queued.put(handle)
        return handle

    def release(self, number: int) -> None:
        self._gates[number].set()

    def _device(self) -> None:
        while True:
            handle = self._queued.get()
            if self.gated:
                self._gates[handle.number].wait(timeout=30)
            seconds = self.delay_s + self.face_s * sum(job.faces.shape[0] for job in handle.jobs)
            if seconds:
                time.sleep(seconds)
            handle.results = [JobResult(*fake_enhanced(job.faces, job.options)) for job in handle.jobs]
            with self._lock:
                self.events.append(("done", handle.number))
            handle.done.set()


class _FakeQueued:
    def __init__(self, pipeline: QueuedFakePipeline, number: int, jobs: list[Job]):
        self.pipeline, self.number, self.jobs = pipeline, number, jobs
        self.results: list[JobResult] = []
        self.done = threading.Event()

    def result(self) -> list[JobResult]:
        if not self.done.wait(timeout=30):
            raise RuntimeError(f"fake device: batch {self.number} never finished")
        with self.pipeline._lock:
            self.pipeline.events.append(("result", self.number))
        if self.pipeline.fail_result_if is not None and self.pipeline.fail_result_if(self.number):
            raise RuntimeError("fake device failure seen at the wait")
        return self.results


def random_faces(rng: np.random.Generator, count: int, size: int = 64) -> np.ndarray:
    """Random BGR faces with no all-black face among them (those mean NO_FACE to the fake)."""
    return rng.integers(1, 256, (count, size, size, 3), dtype=np.uint8)

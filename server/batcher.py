"""Dynamic batching: one bounded queue of faces from every caller, cut into device batches.

Knows nothing about gRPC: requests come in as numpy faces, results go out as EnhanceResult.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from contract.types import EnhanceOptions, EnhanceResult
from server.jobs import DeviceOutOfMemory, Job, JobResult, Pipeline, Started, start_batch

log = logging.getLogger(__name__)

#: The name of the one thread that runs device batches.
DEVICE_THREAD_PREFIX = "faceenhance-device"
#: The name of the one thread that waits for a queued batch's results (overlap_batches).
RESULTS_THREAD_PREFIX = "faceenhance-results"


class QueueFull(Exception):
    """The shared queue has no room for this request now (RESOURCE_EXHAUSTED)."""


class NotAccepting(Exception):
    """The service takes no new work: it is starting up or shutting down (UNAVAILABLE)."""


class PipelineFailed(Exception):
    """The device batch carrying this request failed (INTERNAL)."""


class DeadlineExceeded(Exception):
    """The caller's deadline passed before its faces reached the device (DEADLINE_EXCEEDED)."""


class DeviceFull(Exception):
    """The device ran out of memory on a batch of one face: none left to try it in (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class _Request:
    """One submitted request while it is queued, split and computed."""

    faces: np.ndarray
    options: EnhanceOptions
    landmarks: np.ndarray | None
    arrival: float
    future: asyncio.Future
    deadline: float | None = None  # time.monotonic() after which nobody waits for the answer
    video: object | None = None  # steady_video: the stream's alignment filter
    handed_out: int = 0  # faces already given to batches (the rest are queued)
    finished: int = 0  # faces with results
    parts: list[tuple[int, JobResult]] = field(default_factory=list)
    device_start: float = 0.0  # when the device started on its latest batch
    compute_s: float = 0.0

    @property
    def count(self) -> int:
        return self.faces.shape[0]


@dataclass(eq=False)
class _Batch:
    """A batch handed to the device and not yet answered."""

    jobs: list[Job]
    owners: list[tuple[_Request, int, int]]  # (request, first face, faces) per job
    faces: int
    handle: Started | None = None
    queued_at: float = 0.0  # time.monotonic() when the device thread began queueing it


class Batcher:
    """Forms batches of up to max_batch_faces, waiting at most max_delay_ms after the oldest arrival.

    Device work runs on one dedicated thread, so the event loop keeps reading and answering.
    Use from one event loop: `start()`, then `await submit(...)`, finally `drain()` / `close()`.

    With `overlap` (and a pipeline that has `start`, server/jobs.py), a full batch is queued
    on the device while the one before it still computes: its upload, detection launches and
    the host work between them no longer leave the device idle between batches. At most two
    batches are on the device at once; a batch that is not full still waits for the device
    (and then max_delay_ms, as without overlap), so overlap never makes batches smaller. The
    wait for a queued batch's results runs on a second thread (RESULTS_THREAD_PREFIX), and
    results are answered in the order the batches were queued.

    A batch the device has no memory for (the pipeline raises DeviceOutOfMemory) goes back to
    the head of the queue, its faces in their order, and from then on batches hold at most half
    its faces (`batch_ceiling`): the same faces run again, smaller, and no caller loses them. A
    single face that does not fit fails with DeviceFull. After `recover_s` without running out,
    the ceiling doubles again, up to max_batch_faces: memory another program held comes back.
    """

    #: Seconds without running out of memory before the ceiling doubles again.
    RECOVER_S = 30.0

    def __init__(self, pipeline: Pipeline, max_batch_faces: int, max_delay_ms: float,
                 max_queue_faces: int, metrics=None, recover_s: float = RECOVER_S, overlap: bool = False):
        if max_batch_faces < 1 or max_queue_faces < 1 or max_delay_ms < 0:
            raise ValueError("max_batch_faces and max_queue_faces must be >= 1, max_delay_ms >= 0")
        self.pipeline = pipeline
        self.max_batch_faces = max_batch_faces
        #: Most faces in a batch now: max_batch_faces, less after the device ran out of memory.
        self.batch_ceiling = max_batch_faces
        self.recover_s = recover_s
        self._shrunk_at = 0.0  # time.monotonic() of the last running out (or growing back)
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue_faces = max_queue_faces
        self.metrics = metrics
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_faces = 0
        self._wakeup = asyncio.Event()
        self._accepting = False
        #: Most batches on the device at once: 2 with overlap, else 1 (the next batch is formed
        #: once the last one is answered).
        self.device_depth = 2 if overlap else 1
        self._launched: collections.deque[_Batch] = collections.deque()  # on the device, in order
        self._deliveries: set[asyncio.Task] = set()
        self._last_done = 0.0  # time.monotonic() when the device finished the last batch
        self._idle = asyncio.Event()
        self._idle.set()
        self._former: asyncio.Task | None = None
        self._device = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=DEVICE_THREAD_PREFIX)
        self._results = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=RESULTS_THREAD_PREFIX)
        if metrics is not None:
            metrics.batch_ceiling.set(max_batch_faces)

    @property
    def queued_faces(self) -> int:
        return self._queued_faces

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def _computing(self) -> bool:
        """Some batch is on the device (being queued, computing, or its results being read)."""
        return bool(self._launched)

    def start(self) -> None:
        if self._former is None:
            self._accepting = True
            self._former = asyncio.get_running_loop().create_task(
                self._form_batches(), name="faceenhance-batcher")
            self._former.add_done_callback(self._former_ended)

    async def submit(self, faces: np.ndarray, options: EnhanceOptions,
                     landmarks: np.ndarray | None = None, deadline: float | None = None,
                     video=None) -> EnhanceResult:
        """Queue faces (N, H, W, 3) uint8 and wait for their results, in order.

        Raises QueueFull at once when they do not fit, NotAccepting when draining,
        PipelineFailed when the device failed on them, DeviceFull when it had no memory for one
        of them alone, DeadlineExceeded when `deadline`
        (time.monotonic()) passed before they reached the device. Cancelling the caller drops
        the faces that have not reached the device yet.
        """
        if not self._accepting:
            raise NotAccepting("the service is shutting down and takes no new work; "
                               "retry on another replica")
        count = faces.shape[0]
        if count == 0:
            raise ValueError("submit needs at least one face")
        if self._queued_faces + count > self.max_queue_faces:
            self._expire()  # work nobody waits for any more gives its room back first
        if self._queued_faces + count > self.max_queue_faces:
            raise QueueFull(
                f"the queue is full: {self._queued_faces} faces are waiting (limit "
                f"{self.max_queue_faces}) and this request has {count}; retry later, send "
                "smaller requests, or add replicas")
        loop = asyncio.get_running_loop()
        request = _Request(faces, options, landmarks, time.monotonic(), loop.create_future(),
                           deadline=deadline, video=video)
        self._queue.append(request)
        self._change_queued(count)
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop(request)
            raise

    async def drain(self, timeout: float) -> bool:
        """Stop taking work and finish what was accepted, for at most `timeout` seconds.

        Returns True when everything finished; what is left after the timeout fails with
        NotAccepting.
        """
        self._accepting = False
        self._wakeup.set()  # a batch waiting for company goes now
        deadline = time.monotonic() + max(0.0, timeout)
        while self._queue or self._computing:
            self._idle.clear()  # set again by whoever leaves the batcher idle
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except asyncio.TimeoutError:
                break
        finished = not (self._queue or self._computing)
        if not finished:
            self._fail_queued(NotAccepting("the service shut down before this request reached "
                                           "the device; retry on another replica"))
        return finished

    def abandon(self) -> None:
        """Give up on everything accepted: queued requests and the batch on the device fail
        with NotAccepting now (their callers fall back at once); the device may still finish
        that batch, unseen."""
        self._accepting = False
        stopping = NotAccepting("the service is shutting down before this request could be "
                                "finished; retry on another replica")
        self._fail_queued(stopping)
        for batch in list(self._launched):
            for request, _, _ in batch.owners:
                self._fail(request, stopping)

    async def close(self) -> None:
        """Stop at once: queued requests fail with NotAccepting; the device thread is released."""
        self.abandon()
        if self._former is not None:
            self._former.cancel()
            try:
                await self._former
            except asyncio.CancelledError:
                pass
        for task in list(self._deliveries):
            task.cancel()
        self._device.shutdown(wait=False, cancel_futures=True)
        self._results.shutdown(wait=False, cancel_futures=True)

    # --- inside ------------------------------------------------------------------------------

    def _former_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Should not happen; if it does, refuse work loudly rather than queue it forever.
            log.error("the batcher stopped unexpectedly", exc_info=task.exception())
            self._accepting = False
            self._fail_queued(PipelineFailed(f"the batcher stopped: {task.exception()}"))

    def _change_queued(self, delta: int) -> None:
        self._queued_faces += delta
        if self.metrics is not None:
            self.metrics.queue_faces.set(self._queued_faces)

    def _unqueue(self, request: _Request) -> bool:
        """Take a request's not-yet-batched faces out of the queue; True if there were any."""
        if request.handed_out >= request.count:
            return False
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        self._change_queued(-(request.count - request.handed_out))
        request.handed_out = request.count
        return True

    def _drop(self, request: _Request) -> None:
        """Forget a request whose caller went away; faces already on the device finish unseen."""
        if self._unqueue(request):
            self._wakeup.set()
        if not self._queue and not self._computing:
            self._idle.set()

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            request = self._queue.popleft()
            self._change_queued(-(request.count - request.handed_out))
            request.handed_out = request.count
            if not request.future.done():
                request.future.set_exception(error)
        if not self._computing:
            self._idle.set()

    async def _form_batches(self) -> None:
        while True:
            while not self._queue:
                if not self._launched:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            if len(self._launched) >= self.device_depth:  # woken by an answered batch
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            if not self._queue:
                continue  # everything waiting was cancelled
            jobs, owners = self._take_batch()
            if jobs:  # (empty when everything waiting had expired)
                await self._launch(jobs, owners)

    async def _wait_for_company(self) -> None:
        """Until the queue holds a full batch or its oldest request has waited max_delay_ms;
        while a batch is on the device (overlap), until the queue holds a full batch or that
        batch is answered, and then as without it."""
        self._grow_back()
        while self._queue and self._queued_faces < self.batch_ceiling and self._accepting:
            if self._launched:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            remaining = self._queue[0].arrival + self.max_delay_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _expire(self) -> int:
        """Fail every queued request whose caller's deadline has passed; the faces it frees."""
        now, freed = time.monotonic(), 0
        for request in [r for r in self._queue if r.deadline is not None and r.deadline <= now]:
            before = self._queued_faces
            self._fail(request, DeadlineExceeded(
                f"the caller's deadline passed after {now - request.arrival:.3f} s in the queue, "
                f"before its faces reached the device; they were not computed"))
            freed += before - self._queued_faces
            if self.metrics is not None:
                self.metrics.expired_faces.inc(request.count)
        return freed

    def _take_batch(self) -> tuple[list[Job], list[tuple[_Request, int, int]]]:
        """Up to batch_ceiling faces from the head of the queue, splitting the last request;
        requests whose deadline passed are dropped first, never computed."""
        self._expire()
        jobs: list[Job] = []
        owners: list[tuple[_Request, int, int]] = []
        limit = room = self.batch_ceiling
        while room and self._queue:
            request = self._queue[0]
            start = request.handed_out
            take = min(room, request.count - start)
            stop = start + take
            landmarks = None if request.landmarks is None else request.landmarks[start:stop]
            jobs.append(Job(request.faces[start:stop], request.options, landmarks, video=request.video))
            owners.append((request, start, take))
            request.handed_out = stop
            room -= take
            if stop == request.count:
                self._queue.popleft()
        self._change_queued(-(limit - room))
        return jobs, owners

    def _start_timed(self, jobs: Sequence[Job]) -> tuple[Started, float]:
        """Runs on the device thread: the batch queued on the device (or computed, for a
        pipeline without `start`), and when that began."""
        queued_at = time.monotonic()
        return start_batch(self.pipeline, jobs), queued_at

    @staticmethod
    def _result_timed(handle: Started) -> tuple[list[JobResult], float]:
        """Runs on the results thread: the batch's results, and when the device had them."""
        results = handle.result()
        return results, time.monotonic()

    def _device_faces_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.device_batch_faces.set(sum(batch.faces for batch in self._launched))

    async def _launch(self, jobs: list[Job], owners: list[tuple[_Request, int, int]]) -> None:
        """Queue the batch on the device (the device thread), then answer it from a task of
        its own, so that the next batch may be formed meanwhile (overlap)."""
        loop = asyncio.get_running_loop()
        batch = _Batch(jobs, owners, sum(take for _, _, take in owners))
        self._launched.append(batch)
        self._device_faces_changed()
        try:
            batch.handle, batch.queued_at = await loop.run_in_executor(self._device, self._start_timed, jobs)
        except BaseException as exc:
            self._launched.remove(batch)
            self._device_faces_changed()
            try:
                if isinstance(exc, DeviceOutOfMemory):  # its faces go back to the queue
                    self._out_of_memory(owners, batch.faces, exc)
                elif isinstance(exc, Exception):  # one bad batch must not stop the batcher
                    log.exception("device batch of %d faces failed", batch.faces)
                    self._fail_batch(batch, exc)
                else:
                    raise
            finally:
                self._batch_left()
            return
        task = loop.create_task(self._answer(batch), name="faceenhance-answer")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _answer(self, batch: _Batch) -> None:
        """Wait (on the results thread) for a batch on the device; answer its requests."""
        loop = asyncio.get_running_loop()
        try:
            results, done_at = await loop.run_in_executor(self._results, self._result_timed, batch.handle)
            results = list(results)
            _check_results(batch.jobs, results)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the batcher
            log.exception("device batch of %d faces failed", batch.faces)
            self._fail_batch(batch, exc)
            return
        finally:
            self._launched.remove(batch)
            self._device_faces_changed()
            self._batch_left()
        # The device's time for this batch: from when it began queueing, or when the device
        # finished the batch before it, whichever came later.
        started = max(batch.queued_at, self._last_done)
        seconds = max(0.0, done_at - started)
        self._last_done = done_at
        if self.metrics is not None:
            self.metrics.batch_faces.observe(batch.faces)
            self.metrics.compute.observe(seconds)
        for (request, start, take), result in zip(batch.owners, results):
            request.device_start = started
            request.compute_s += seconds
            request.parts.append((start, result))
            request.finished += take
            if request.finished == request.count and not request.future.done():
                self._complete(request)

    def _batch_left(self) -> None:
        """A batch left the device: the former may form the next one; idle when nothing is left."""
        self._wakeup.set()
        if not self._queue and not self._launched:
            self._idle.set()

    def _fail_batch(self, batch: _Batch, exc: Exception) -> None:
        error = PipelineFailed(f"enhancing failed on the server: {type(exc).__name__}: {exc}")
        for request, _, _ in batch.owners:
            self._fail(request, error)

    def _out_of_memory(self, owners: list[tuple[_Request, int, int]], faces: int,
                       error: DeviceOutOfMemory) -> None:
        """The batch's faces go back to the head of the queue, in their order, and the ceiling
        comes down to half of them; one face that did not fit fails its request."""
        self._shrunk_at = time.monotonic()
        self._set_ceiling(min(self.batch_ceiling, max(1, faces // 2)))
        if self.metrics is not None:
            self.metrics.device_out_of_memory.inc()
        if faces == 1:
            log.error("%s; failing its request (RESOURCE_EXHAUSTED)", error)
            full = DeviceFull(f"{error}: the device has no memory for even one face now; retry "
                              "later or on another replica")
            for request, _, _ in owners:
                self._fail(request, full)
            return
        log.warning("%s; its faces go back to the queue, and batches hold at most %d faces for "
                    "the next %.0f s", error, self.batch_ceiling, self.recover_s)
        for request, start, take in reversed(owners):
            if request.future.done():  # cancelled or failed while on the device: nobody waits
                continue
            request.handed_out = start
            if request not in self._queue:
                self._queue.appendleft(request)
            self._change_queued(take)

    def _grow_back(self) -> None:
        """Double the ceiling (up to max_batch_faces) once recover_s passed without running out."""
        if self.batch_ceiling < self.max_batch_faces and time.monotonic() - self._shrunk_at >= self.recover_s:
            self._shrunk_at = time.monotonic()
            self._set_ceiling(min(self.max_batch_faces, self.batch_ceiling * 2))
            log.info("no device memory shortage for %.0f s: batches hold up to %d faces again",
                     self.recover_s, self.batch_ceiling)

    def _set_ceiling(self, faces: int) -> None:
        self.batch_ceiling = faces
        if self.metrics is not None:
            self.metrics.batch_ceiling.set(faces)

    def _complete(self, request: _Request) -> None:
        parts = sorted(request.parts, key=lambda part: part[0])
        if len(parts) == 1:
            faces, status = parts[0][1].faces, list(parts[0][1].status)
        else:
            faces = np.concatenate([part.faces for _, part in parts])
            status = [s for _, part in parts for s in part.status]
        queue_s = max(0.0, request.device_start - request.arrival)
        if self.metrics is not None:
            self.metrics.queue_wait.observe(queue_s)
        request.future.set_result(EnhanceResult(
            faces=faces, status=status, queue_ms=queue_s * 1000.0,
            compute_ms=request.compute_s * 1000.0))

    def _fail(self, request: _Request, error: Exception) -> None:
        self._unqueue(request)  # its later chunks are pointless now
        request.handed_out = request.count
        if not request.future.done():
            request.future.set_exception(error)


def _check_results(jobs: Sequence[Job], results: Sequence[JobResult]) -> None:
    """A pipeline answer that does not fit its jobs is a server bug: fail the batch, not the loop."""
    if len(results) != len(jobs):
        raise RuntimeError(f"pipeline returned {len(results)} results for {len(jobs)} jobs")
    for job, result in zip(jobs, results):
        count, size = job.faces.shape[0], job.options.output_size
        if result.faces.shape != (count, size, size, 3) or len(result.status) != count:
            raise RuntimeError(
                f"pipeline returned faces {result.faces.shape} with {len(result.status)} statuses "
                f"for a job of {count} faces at output_size {size}")

"""The blocking client for threads and plain scripts: the asyncio client running on an event
loop in a daemon thread, with `submit()` futures so many batches can be in flight at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Sequence

import numpy as np

from client.aio import AsyncFaceEnhanceClient, ServiceInfo
from client.breaker import BreakerConfig
from client.security import Security
from contract.types import EnhanceOptions, EnhanceResult, InvalidRequest, ModelSpec

_CLOSE_TIMEOUT_S = 10.0


class FaceEnhanceClient:
    """Same arguments and behaviour as AsyncFaceEnhanceClient, with blocking calls."""

    def __init__(self, targets: str | Sequence[str], *, options: EnhanceOptions = EnhanceOptions(),
                 timeout_ms: float = 1000, streams_per_target: int = 1, max_in_flight: int = 4,
                 breaker: BreakerConfig = BreakerConfig(), registry=None,
                 expect_model: ModelSpec | None = None, security: Security | None = None):
        self._client = AsyncFaceEnhanceClient(
            targets, options=options, timeout_ms=timeout_ms, streams_per_target=streams_per_target,
            max_in_flight=max_in_flight, breaker=breaker, registry=registry,
            expect_model=expect_model, security=security)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="faceenhance-client", daemon=True)
        self._thread.start()
        self._closed = False
        self._in_flight: set[concurrent.futures.Future] = set()
        self._in_flight_lock = threading.Lock()  # the loop thread removes, callers add

    def submit(self, faces, options: EnhanceOptions | None = None, landmarks=None,
               timeout_ms: float | None = None) -> concurrent.futures.Future[EnhanceResult]:
        """Start enhancing a batch and return at once; the future never fails for service
        trouble (see enhance). A caller error raises InvalidRequest here, not in the future."""
        started = time.perf_counter()
        try:
            faces, options, landmarks = self._client.check(faces, options, landmarks)
        except InvalidRequest:
            self._client.metrics.observe_invalid(time.perf_counter() - started)
            raise
        # The batch is encoded later on the loop thread: take a private copy now, so the caller
        # may reuse its buffer as soon as submit() returns.
        faces = np.array(faces, dtype=np.uint8, order="C", copy=True)
        future = asyncio.run_coroutine_threadsafe(
            self._client.enhance(faces, options, landmarks, timeout_ms), self._loop)
        with self._in_flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)

    def _still_in_flight(self) -> list[concurrent.futures.Future]:
        with self._in_flight_lock:
            return list(self._in_flight)

    def enhance(self, faces, options: EnhanceOptions | None = None, landmarks=None,
                timeout_ms: float | None = None) -> EnhanceResult:
        """Enhance (N, H, W, 3) uint8 BGR faces and wait; falls back locally, never raises for
        service trouble; raises InvalidRequest for a caller error."""
        return self.submit(faces, options, landmarks, timeout_ms).result()

    def info(self, timeout_ms: float | None = None) -> ServiceInfo:
        """What the service serves; raises ServiceUnreachable when no target answers."""
        return self._run(self._client.info(timeout_ms))

    def stats(self) -> dict:
        return self._client.stats()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Batches still in flight fall back now (their streams are closed) and resolve
            # before the loop stops; none is left waiting forever.
            self._run(self._client.close(), timeout=_CLOSE_TIMEOUT_S)
            concurrent.futures.wait(self._still_in_flight(), timeout=_CLOSE_TIMEOUT_S)
        finally:
            for future in self._still_in_flight():
                future.cancel()
            try:
                self._run(_settle_tasks(), timeout=_CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - closing goes on: the loop stops either way
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_CLOSE_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> "FaceEnhanceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)


async def _settle_tasks() -> None:
    """What asyncio.run does before it closes its loop: the loop's other tasks (gRPC's own
    per-call status tasks among them) are cancelled and run to their end, and async generators
    are closed, so that none is destroyed pending ("Task was destroyed but it is pending!" on
    the caller's stderr, at exit or at the next garbage collection)."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()

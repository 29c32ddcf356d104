"""GFPGANEnhancer: MuseTalk's decoded face batches through the gfpgan-service, answered later
as lazy faces (so the next UNet batch runs meanwhile), every face exactly once, in order.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time

import cv2
import numpy as np

from musetalk_adapter.config import GFPGANSettings
from musetalk_adapter.summary import RunSummary

log = logging.getLogger("musetalk_adapter")

#: How long past the batch deadline a result may be late before the adapter stops waiting
#: for the client and resizes locally (the client itself falls back at the deadline).
_GRACE_S = 5.0


class PendingBatch:
    """One decoded batch on its way to the service: a sequence of LazyFace, in batch order.

    Iterating it is what MuseTalk does right after decode_latents; the faces resolve (wait for
    the service, or fall back) only when MuseTalk reads their pixels.
    """

    def __init__(self, enhancer: "GFPGANEnhancer", faces: np.ndarray,
                 future: concurrent.futures.Future | None, fallback_reason: str | None = None):
        self._enhancer = enhancer
        self._decoded = faces  # kept until resolved: the local fallback needs it
        self._future = future
        self._early_reason = fallback_reason
        self._lock = threading.Lock()  # the blending worker and the decode loop may both resolve
        self._faces: np.ndarray | None = None
        self.fell_back = False
        self.fallback_reason: str | None = None
        size = enhancer.settings.output_size if enhancer.enabled else faces.shape[1]
        self._shape = (faces.shape[0], size, size, 3)
        self.items = [LazyFace(self, j) for j in range(faces.shape[0])]

    # --- the sequence MuseTalk iterates -------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self.items[index]
        return self.faces()[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __array__(self, dtype=None, copy=None):
        faces = self.faces()
        return faces if dtype is None else faces.astype(dtype)

    def done(self) -> bool:
        future = self._future  # read once: the blending thread may resolve the batch meanwhile
        return self._faces is not None or future is None or future.done()

    # --- resolution ----------------------------------------------------------------------
    def faces(self) -> np.ndarray:
        """(B, out, out, 3) uint8 BGR: the service's answer or the local resize; never raises."""
        if self._faces is None:
            with self._lock:
                if self._faces is None:
                    self._faces = self._resolve()
                    self._decoded = None
                    self._future = None
        return self._faces

    def _resolve(self) -> np.ndarray:
        enhancer = self._enhancer
        started = time.perf_counter()
        reason, detail, result = self._early_reason, "", None
        if self._future is not None:
            try:
                result = self._future.result(timeout=enhancer.settings.timeout_ms / 1000 + _GRACE_S)
            except concurrent.futures.TimeoutError:
                reason, detail = "timeout", "no answer from the client past the deadline"
            except BaseException as error:  # noqa: BLE001 - the run must go on (see the issue)
                reason, detail = "adapter_error", f"{type(error).__name__}: {error}"
        waited = time.perf_counter() - started
        if result is not None and result.faces.shape == self.shape and len(result.status) == len(self):
            faces = result.faces
            self.fell_back, self.fallback_reason = result.fell_back, result.fallback_reason
            enhancer.summary.record(result.status, result.fallback_reason if result.fell_back else None,
                                    waited)
            if result.fell_back:
                enhancer.log_fallback(result.fallback_reason, result.extra.get("fallback_detail", ""))
        else:
            if result is not None:
                reason, detail = "adapter_error", f"answer of shape {result.faces.shape}"
            faces = resize_faces(self._decoded, self.shape[1])
            self.fell_back, self.fallback_reason = True, reason or "adapter_error"
            enhancer.summary.record(None, self.fallback_reason, waited, count=len(self))
            enhancer.log_fallback(self.fallback_reason, detail)
        return faces


class LazyFace:
    """One face of a PendingBatch; behaves like MuseTalk's (256, 256, 3) uint8 BGR array where
    MuseTalk uses it (`.astype(np.uint8)`, `np.asarray`, indexing, `.shape`)."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: PendingBatch, index: int):
        self._batch = batch
        self._index = index

    def resolve(self) -> np.ndarray:
        return self._batch.faces()[self._index]

    def astype(self, dtype, *args, **kwargs) -> np.ndarray:
        return self.resolve().astype(dtype, *args, **kwargs)

    def copy(self) -> np.ndarray:
        return self.resolve().copy()

    def __array__(self, dtype=None, copy=None):
        face = self.resolve()
        return face if dtype is None else face.astype(dtype)

    def __getitem__(self, index):
        return self.resolve()[index]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._batch.shape[1:]

    dtype = np.dtype(np.uint8)
    ndim = 3

    @property
    def fell_back(self) -> bool:
        self._batch.faces()
        return self._batch.fell_back


def resize_faces(faces: np.ndarray, size: int) -> np.ndarray:
    """The local answer: (B, H, W, 3) in any strides -> (B, size, size, 3) C-contiguous."""
    out = np.empty((faces.shape[0], size, size, 3), dtype=np.uint8)
    for j, face in enumerate(faces):
        face = np.ascontiguousarray(face)  # cv2 refuses MuseTalk's negative-stride view
        out[j] = face if face.shape[0] == size else cv2.resize(
            face, (size, size), interpolation=cv2.INTER_LANCZOS4)
    return out


class GFPGANEnhancer:
    """GFPGAN through the service for MuseTalk. The sketch's interface (enhance_face,
    enhance_batch, resize_to_original) blocks; submit_batch is the overlapped path the hook uses.
    A disabled enhancer (settings.enabled False) hands faces back untouched."""

    def __init__(self, settings: GFPGANSettings | None = None, *, client=None, **overrides):
        from dataclasses import replace

        settings = replace(settings or GFPGANSettings(enabled=True), **overrides).check()
        self.settings = settings
        self.summary = RunSummary()
        self._pending: collections.deque[PendingBatch] = collections.deque()
        self._logged_reasons: set[str] = set()
        self._metrics_server = None
        self._registry = None
        if settings.metrics_port:
            self._start_metrics()
        self._client = client
        if self.enabled and client is None:
            from client import FaceEnhanceClient

            self._client = FaceEnhanceClient(
                settings.address, options=settings.enhance_options(),
                timeout_ms=settings.timeout_ms, max_in_flight=settings.max_pending_batches,
                registry=self._registry)

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # --- the overlapped path ---------------------------------------------------------------
    def submit_batch(self, faces) -> PendingBatch:
        """Send (B, H, W, 3) uint8 BGR faces (any strides) and return at once; the answer is
        read when MuseTalk reads the faces. Waits first only when max_pending_batches are
        still unanswered (the oldest one)."""
        faces = np.asarray(faces)
        if not self.enabled:
            # No service: the faces themselves, as one resolved batch (no copy, no resize).
            batch = PendingBatch(self, faces, None)
            batch._faces, batch._decoded = faces, None
            return batch
        self._make_room()
        try:
            future = self._client.submit(faces)
        except Exception as error:  # noqa: BLE001 - a bad batch must not stop the video
            self.log_fallback("invalid", f"{type(error).__name__}: {error}")
            batch = PendingBatch(self, faces, None, fallback_reason="invalid")
        else:
            batch = PendingBatch(self, faces, future)
        self._pending.append(batch)
        return batch

    def _make_room(self) -> None:
        # Answered batches are resolved here, at no wait: that frees their decoded copy, which
        # matters in the offline script, where MuseTalk holds every frame until the end.
        while self._pending and self._pending[0].done():
            self._pending.popleft().faces()
        while len(self._pending) >= self.settings.max_pending_batches:
            oldest = self._pending.popleft()
            started = time.perf_counter()
            if oldest._future is not None:
                concurrent.futures.wait([oldest._future],
                                        timeout=self.settings.timeout_ms / 1000 + _GRACE_S)
            self.summary.add_backpressure(time.perf_counter() - started)
            oldest.faces()

    # --- the sketch's interface ------------------------------------------------------------
    def enhance_batch(self, faces) -> np.ndarray:
        """(B, H, W, 3) uint8 BGR -> (B, out, out, 3) uint8 BGR, in order; never raises for
        service trouble (the batch is resized locally instead)."""
        return self.submit_batch(faces).faces()

    def enhance_face(self, face) -> np.ndarray:
        """(H, W, 3) uint8 BGR -> (out, out, 3) uint8 BGR."""
        return self.enhance_batch(np.asarray(face)[None])[0]

    @staticmethod
    def resize_to_original(face, box) -> np.ndarray:
        """Resize an (enhanced) face to its box in the video frame, as MuseTalk does before
        blending; `box` is MuseTalk's (x1, y1, x2, y2) or a (width, height) pair."""
        width, height = (box[2] - box[0], box[3] - box[1]) if len(box) == 4 else box
        return cv2.resize(np.ascontiguousarray(np.asarray(face), dtype=np.uint8),
                          (int(width), int(height)))

    # --- the end of the run -----------------------------------------------------------------
    def log_fallback(self, reason: str, detail: str) -> None:
        # Once per reason: a service that is down would otherwise log every batch of the video.
        if reason not in self._logged_reasons:
            self._logged_reasons.add(reason)
            log.warning("GFPGAN: batch resized locally instead (%s)%s; later batches with the same "
                        "reason are only counted", reason, f": {detail}" if detail else "")

    def close(self) -> RunSummary:
        """Answer what is still pending, close the client, return the summary."""
        for batch in list(self._pending):
            batch.faces()
        self._pending.clear()
        if self._client is not None:
            self._client.close()
            self._client = None
        return self.summary

    def __enter__(self) -> "GFPGANEnhancer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self._registry = CollectorRegistry()
        self.summary.export_to(self._registry)
        self._metrics_server, _ = start_http_server(
            self.settings.metrics_port, addr=self.settings.metrics_host, registry=self._registry)

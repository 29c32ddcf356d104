"""GFPGANEnhancer: MuseTalk's decoded face batches through the gfpgan-service, answered later
as lazy faces (so the next UNet batch runs meanwhile), every face exactly once, in order.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
import threading
import time

import cv2
import numpy as np

from musetalk_adapter.config import GFPGANSettings, SettingsError
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


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resize_faces(faces: np.ndarray, size: int) -> np.ndarray:
    """The local answer: (B, H, W, 3) in any strides -> (B, size, size, 3) C-contiguous."""
    out = np.empty((faces.shape[0], size, size, 3), dtype=np.uint8)
    for j, face in enumerate(faces):
        face = np.ascontiguousarray(face)  # cv2 refuses MuseTalk's negative-stride view
        out[j] = face if face.shape[0] == size else cv2.resize(
            face, (size, size), interpolation=cv2.INTER_LANCZOS4)
    return out


class ModelMismatch(SettingsError):
    """The service serves another model than the settings name; raised at start."""


class GFPGANEnhancer:
    """GFPGAN through the service for MuseTalk. The plan's interface (enhance_face,
    enhance_batch, enhance_batch_optimized, resize_to_original) blocks; submit_batch is the
    overlapped path the hook uses. A disabled enhancer (settings.enabled False) hands faces
    back untouched.

    Made as the plan makes it, `GFPGANEnhancer(model_path=..., upscale=2, arch="clean",
    channel_multiplier=2, bg_upsampler=None, device=None)`, or from GFPGANSettings. Where the
    model keys are set, the service is asked at once what it serves, and ModelMismatch (a
    SettingsError) names both models when it is another; a service that cannot be asked yet
    is asked again before its first batch, and gets no faces if it serves another model.
    """

    def __init__(self, settings: GFPGANSettings | str | None = None, *, client=None, **overrides):
        from dataclasses import replace

        if isinstance(settings, (str, os.PathLike)):  # GFPGANEnhancer("models/gfpgan/...pth")
            overrides.setdefault("model_path", os.fspath(settings))
            settings = None
        settings = replace(settings or GFPGANSettings(enabled=True), **overrides).check()
        self.settings = settings
        self.summary = RunSummary()
        self.service_info = None
        #: What the start found worth saying (model checked or not, device, bg_upsampler).
        self.notes: list[str] = []
        self._pending: collections.deque[PendingBatch] = collections.deque()
        self._logged_reasons: set[str] = set()
        self._metrics_server = None
        self._registry = None
        self._client = client
        if not self.enabled:
            return
        spec = settings.model_spec()
        if spec.model_path is not None and os.path.isfile(spec.model_path):
            from dataclasses import replace as replace_spec

            spec = replace_spec(spec, sha256=_sha256_file(spec.model_path))
        if settings.metrics_port:
            self._start_metrics()
        if client is None:
            from client import FaceEnhanceClient

            self._client = FaceEnhanceClient(
                settings.address, options=settings.enhance_options(),
                timeout_ms=settings.timeout_ms, max_in_flight=settings.max_pending_batches,
                registry=self._registry, expect_model=spec or None, security=settings.security())
        try:
            self._check_service(spec)
        except BaseException:
            self.close()
            raise

    def _check_service(self, spec) -> None:
        """Ask the service what it serves; stop on another model; note what is not ours."""
        from client import AccessDenied, ServiceUnreachable
        from contract.types import describe_model

        s = self.settings
        try:
            info = self._client.info(timeout_ms=s.timeout_ms)
        except AccessDenied as error:  # not a passing fault: every batch would fall back
            raise SettingsError(str(error)) from None
        except ServiceUnreachable as error:
            info = None
            self.notes.append(f"no service answered at start ({error}); batches are resized "
                              f"locally until one does")
            if spec:
                self.notes.append("the model could not be checked at start; each service is "
                                  "checked before its first batch instead, and gets no faces "
                                  "if it serves another model")
        if info is not None:
            self.service_info = info
            problems = spec.mismatches(info) if spec else []
            if problems:
                raise ModelMismatch(
                    f"the service at {info.target} serves another model than this run expects: "
                    + "; ".join(problems) + ". Point 'address' at a service that serves it, or "
                    "change the model settings (model_path / --gfpgan_model, arch, "
                    "channel_multiplier) to the served model")
            checked = " (checked: " + ", ".join(
                key for key, value in (("model_path", spec.model_path), ("sha256", spec.sha256),
                                       ("arch", spec.arch),
                                       ("channel_multiplier", spec.channel_multiplier))
                if value is not None) + ")" if spec else ""
            self.notes.append(f"service at {info.target}: {describe_model(info)} on {info.device}, "
                              f"{info.dtype}{checked}")
        if s.device is not None:
            where = info.device if info is not None else "the service's device"
            self.notes.append(f"device {s.device!r} is not used here: the service runs the model "
                              f"(on {where})")
        if s.bg_upsampler is not None:
            if info is not None and "realesrgan" not in info.backgrounds:
                raise ModelMismatch(
                    f"bg_upsampler realesrgan: the service at {info.target} has no Real-ESRGAN "
                    f"loaded (its backgrounds: {', '.join(info.backgrounds) or 'not reported'}); "
                    f"start it with --bg-upsampler realesrgan-x2, or set bg_upsampler: none")
            self.notes.append("bg_upsampler realesrgan: the service upsamples each crop around the "
                              "face with Real-ESRGAN" + (
                                  "; at upscale 1 it is enlarged and resized back to 256, a network "
                                  "pass per face for little" if s.upscale == 1 else ""))
        for note in self.notes:
            log.info("GFPGAN: %s", note)

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

    def enhance_batch_optimized(self, faces, batch_size: int = 4) -> np.ndarray:
        """The plan's batched call: faces ((N, H, W, 3) uint8 BGR, or a list of (H, W, 3)) go
        out `batch_size` at a time, up to max_pending_batches in flight together, and come back
        as one (N, out, out, 3) array in order; never raises for service trouble."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of 1 or more; got {batch_size!r}")
        faces = faces if isinstance(faces, np.ndarray) else (
            np.stack([np.asarray(f) for f in faces]) if len(faces) else np.empty((0, 256, 256, 3), np.uint8))
        if faces.ndim != 4:
            raise ValueError(f"faces must be (N, H, W, 3) or a list of (H, W, 3); got shape {faces.shape}")
        size = self.settings.output_size if self.enabled else faces.shape[1]
        batches = [self.submit_batch(faces[i:i + batch_size])
                   for i in range(0, faces.shape[0], int(batch_size))]
        if not batches:
            return np.empty((0, size, size, 3), np.uint8)
        return np.concatenate([batch.faces() for batch in batches])

    @staticmethod
    def resize_to_original(face, box=(256, 256)) -> np.ndarray:
        """Resize an (enhanced) face, or a batch of them, to the original size: MuseTalk's box
        (x1, y1, x2, y2) in the video frame, or a (width, height) pair (default 256x256, the
        crop MuseTalk decoded), as MuseTalk does before blending (bilinear)."""
        width, height = (box[2] - box[0], box[3] - box[1]) if len(box) == 4 else box
        face = np.asarray(face)
        if face.ndim == 4:
            return np.stack([GFPGANEnhancer.resize_to_original(f, (width, height)) for f in face])
        return cv2.resize(np.ascontiguousarray(face, dtype=np.uint8), (int(width), int(height)))

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

"""Prometheus metrics of the service (prefix faceenhance_), in a registry of their own.

Each `Metrics` owns its registry, so tests can build many; `start_http_server` serves /metrics.
"""
from __future__ import annotations

import logging
import math
import os
import sys

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily

from server.jobs import ModelInfo

log = logging.getLogger(__name__)

#: Request outcomes, one per status code the service answers with.
OUTCOMES = ("ok", "invalid_argument", "resource_exhausted", "unavailable", "internal", "cancelled",
            "deadline_exceeded")
RPCS = ("EnhanceBatch", "Enhance")

_BATCH_FACES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Queue waits run from well under a millisecond (idle) to seconds (overloaded).
_QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# One batch: ~10 ms on a big GPU to tens of seconds for a large batch on a CPU.
# Up to 10 minutes: a full batch of large faces on a CPU takes minutes (issue 9: 60 s was the top).
_COMPUTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The service's counters, histograms and gauges; all methods are cheap and loop-safe."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "faceenhance_requests", "Enhance requests answered, by RPC and outcome.",
            ["rpc", "outcome"], registry=r)
        self.faces = Counter(
            "faceenhance_faces", "Faces returned enhanced (or unchanged when no face was found), "
            "by the restorer that ran them (its id).", ["model"], registry=r)
        self.batch_faces = Histogram(
            "faceenhance_batch_faces", "Faces per device batch.",
            buckets=_BATCH_FACES_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "faceenhance_queue_wait_seconds",
            "Time from a request's arrival until the device started on its last batch.",
            buckets=_QUEUE_BUCKETS, registry=r)
        self.compute = Histogram(
            "faceenhance_compute_seconds", "Device time of one batch.",
            buckets=_COMPUTE_BUCKETS, registry=r)
        self.queue_faces = Gauge(
            "faceenhance_queue_faces", "Faces waiting in the shared queue.", registry=r)
        self.in_flight = Gauge(
            "faceenhance_in_flight_requests",
            "Requests accepted and not yet answered (queued or computing).", registry=r)
        self.device_batch_faces = Gauge(
            "faceenhance_device_batch_faces",
            "Faces in the batch the device is computing now (0: the device is idle).", registry=r)
        self.batch_ceiling = Gauge(
            "faceenhance_batch_ceiling_faces",
            "Most faces the batcher puts in a device batch now: --max-batch-faces, or half the "
            "last batch the device ran out of memory on, doubling back every 30 s without.",
            registry=r)
        self.device_out_of_memory = Counter(
            "faceenhance_device_out_of_memory",
            "Device batches that ran out of memory: their faces ran again in smaller batches, "
            "or, for a batch of one face, failed RESOURCE_EXHAUSTED.", registry=r)
        self.unauthenticated = Counter(
            "faceenhance_unauthenticated_requests",
            "Calls refused UNAUTHENTICATED: no bearer token, or one the service was not given.",
            registry=r)
        self.expired_faces = Counter(
            "faceenhance_expired_faces",
            "Faces dropped from the queue, not computed, because their caller's deadline passed.",
            registry=r)
        self.reused_alignments = Counter(
            "faceenhance_reused_alignments",
            "Steady video frames not detected (detect_every): warped with their stream's smoothed "
            "alignment instead.", registry=r)
        self.reused_masks = Counter(
            "faceenhance_reused_masks",
            "Steady video frames pasted with an earlier frame's paste mask (mask_every) instead of "
            "computing their own.", registry=r)
        self.speed_fallbacks = Gauge(
            "faceenhance_speed_fallbacks",
            "Speed forms asked for that did not take effect at warm-up: a CUDA graph capture or a "
            "torch.compile build that failed, or a compiled pass whose faces failed the check "
            "against its eager pass. The service runs them eagerly, slower; the log names them.",
            registry=r)
        self.redetected_images = _ReadCounter(
            "faceenhance_redetected_images",
            "DETECT images detected a second time, the waiting way, because the wait-free "
            "detection (--fixed-detection) could not vouch for its answer: more candidates above "
            "the threshold than it takes, or more faces left after NMS than its rounds settle. "
            "Each costs its request a second pass (a steady-video request: a second detection).", registry=r)
        self.model = Info(
            "faceenhance_model", "The loaded model: name, version, weights SHA-256, device, dtype.",
            registry=r)
        self.device_memory = Gauge(
            "faceenhance_device_memory_bytes",
            "Memory in use: CUDA memory allocated by torch on a GPU, the process's resident "
            "memory on the CPU (NaN where the platform does not say: Windows).", registry=r)
        self._device = "cpu"
        self.device_memory.set_function(self._memory_in_use)
        # Every series exists from the start, so rates and alerts work before the first error.
        for rpc in RPCS:
            for outcome in OUTCOMES:
                self.requests.labels(rpc=rpc, outcome=outcome)

    def set_model(self, info: ModelInfo) -> None:
        self._device = info.device
        for restorer in info.models or ():  # a series per loaded restorer from the start
            self.faces.labels(model=restorer.id)
        self.model.info({"model": info.model_name, "version": info.model_version,
                         "sha256": info.weights_sha256, "device": info.device, "dtype": info.dtype})

    def start_http_server(self, host: str, port: int) -> tuple[object, int]:
        """Serve /metrics on host:port (0 picks a free port). Returns (server, bound port)."""
        server, _thread = _start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port

    def _memory_in_use(self) -> float:
        if self._device.startswith("cuda"):
            torch = sys.modules.get("torch")  # only a CUDA pipeline has imported it
            if torch is not None:
                try:
                    return float(torch.cuda.memory_allocated(self._device))
                except Exception:  # a scrape must never fail because of the device
                    log.debug("torch.cuda.memory_allocated failed", exc_info=True)
        return float(_resident_bytes())


class _ReadCounter:
    """A counter the service does not count itself: read from `read()` (set later) at every
    scrape, e.g. a count the pipeline keeps. 0 until read is set."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.read: Callable[[], float] = lambda: 0
        registry.register(self)

    def describe(self):
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self):
        try:
            value = float(self.read())
        except Exception:  # a scrape must never fail because of what it reads
            log.debug("reading %s failed", self.name, exc_info=True)
            value = math.nan
        yield CounterMetricFamily(self.name, self.documentation, value=value)


def _resident_bytes() -> float:
    """The process's resident set size, from /proc on Linux, else the peak from getrusage (macOS),
    else NaN ("unknown" to Prometheus; Windows has neither): never a scrape that fails."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

"""What a client did, for its owner: batches by outcome, faces by status, fallbacks by reason
and latency, as plain numbers (`stats()`) and optionally as Prometheus metrics.
"""
from __future__ import annotations

import threading
import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram

from contract.types import EnhanceResult, FaceStatus

#: Batch outcomes: every face came from the service / some faces fell back / caller error.
OUTCOMES = ("enhanced", "fallback", "invalid")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Clients that share a registry share its collectors (registering a name twice is an error).
_collectors: "weakref.WeakKeyDictionary[CollectorRegistry, dict]" = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def _collectors_for(registry: CollectorRegistry) -> dict:
    with _collectors_lock:
        found = _collectors.get(registry)
        if found is None:
            found = {
                "batches": Counter(
                    "faceenhance_client_batches", "Batches the client answered, by outcome.",
                    ["outcome"], registry=registry),
                "faces": Counter(
                    "faceenhance_client_faces", "Faces the client answered, by per-face status.",
                    ["status"], registry=registry),
                "fallbacks": Counter(
                    "faceenhance_client_fallbacks",
                    "Batches answered locally by a resize instead of the service, by reason.",
                    ["reason"], registry=registry),
                "latency": Histogram(
                    "faceenhance_client_request_duration_seconds",
                    "Time from enhance() to its answer, fallbacks included, by outcome.",
                    ["outcome"], buckets=_LATENCY_BUCKETS, registry=registry),
            }
            _collectors[registry] = found
        return found


class ClientMetrics:
    """Counts one client's batches; mirrors them into `registry` when one is given."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self._prom = _collectors_for(registry) if registry is not None else None
        self._lock = threading.Lock()  # stats() may be read from another thread
        self.batches = {outcome: 0 for outcome in OUTCOMES}
        self.faces = {status.name.lower(): 0 for status in FaceStatus}
        self.fallbacks: dict[str, int] = {}
        self._latency_sum_s = 0.0

    def observe(self, result: EnhanceResult, seconds: float) -> None:
        """Count one answered batch (from the service, a fallback or a mix)."""
        outcome = "fallback" if result.fell_back else "enhanced"
        with self._lock:
            self.batches[outcome] += 1
            self._latency_sum_s += seconds
            for status in result.status:
                self.faces[FaceStatus(status).name.lower()] += 1
            if result.fell_back:
                self.fallbacks[result.fallback_reason] = self.fallbacks.get(result.fallback_reason, 0) + 1
        if self._prom is not None:
            self._prom["batches"].labels(outcome).inc()
            self._prom["latency"].labels(outcome).observe(seconds)
            for status in set(result.status):
                self._prom["faces"].labels(FaceStatus(status).name.lower()).inc(
                    sum(1 for s in result.status if s == status))
            if result.fell_back:
                self._prom["fallbacks"].labels(result.fallback_reason).inc()

    def observe_invalid(self, seconds: float) -> None:
        """Count a batch that raised InvalidRequest (the caller's bug)."""
        with self._lock:
            self.batches["invalid"] += 1
            self._latency_sum_s += seconds
        if self._prom is not None:
            self._prom["batches"].labels("invalid").inc()
            self._prom["latency"].labels("invalid").observe(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            total = sum(self.batches.values())
            return {
                "batches": total,
                "batches_by_outcome": dict(self.batches),
                "faces": sum(self.faces.values()),
                "enhanced_faces": self.faces["enhanced"],
                "faces_by_status": dict(self.faces),
                "fallbacks": dict(self.fallbacks),
                "mean_latency_ms": 1000.0 * self._latency_sum_s / total if total else 0.0,
            }

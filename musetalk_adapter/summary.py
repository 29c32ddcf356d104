"""What GFPGAN did during a MuseTalk run: faces enhanced, faces that fell back (by reason) and
time MuseTalk spent waiting for the service; printed at the end, exported to Prometheus.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from contract.types import FaceStatus


@dataclass
class RunSummary:
    """Counters for one run; safe to update from MuseTalk's decode loop and blending thread."""

    batches: int = 0
    faces_enhanced: int = 0
    #: Faces the service answered unchanged (it found no face in the crop).
    faces_no_face: int = 0
    #: Faces resized locally instead, by reason ("timeout", "unavailable", ...).
    fell_back: dict[str, int] = field(default_factory=dict)
    #: Seconds MuseTalk waited for answers when it read the faces.
    waiting_s: float = 0.0
    #: Seconds decoding waited because max_pending_batches were still unanswered.
    backpressure_s: float = 0.0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._prom = None

    @property
    def faces(self) -> int:
        return self.faces_enhanced + self.faces_no_face + sum(self.fell_back.values())

    @property
    def faces_fell_back(self) -> int:
        return sum(self.fell_back.values())

    def record(self, statuses, fallback_reason: str | None, waited_s: float, count: int = 0) -> None:
        """Count one answered batch: per-face statuses from the service's answer, or `count`
        faces that fell back for `fallback_reason` when there was no answer at all."""
        enhanced = no_face = fell = 0
        if statuses is None:
            fell = count
        else:
            for status in statuses:
                if status == FaceStatus.ENHANCED:
                    enhanced += 1
                elif status == FaceStatus.NO_FACE:
                    no_face += 1
                else:
                    fell += 1
        with self._lock:
            self.batches += 1
            self.faces_enhanced += enhanced
            self.faces_no_face += no_face
            if fell:
                reason = fallback_reason or "unknown"
                self.fell_back[reason] = self.fell_back.get(reason, 0) + fell
            self.waiting_s += waited_s
        if self._prom is not None:
            faces, waiting = self._prom
            faces.labels("enhanced", "").inc(enhanced)
            faces.labels("no_face", "").inc(no_face)
            if fell:
                faces.labels("fell_back", fallback_reason or "unknown").inc(fell)
            waiting.labels("answer").inc(waited_s)

    def add_backpressure(self, seconds: float) -> None:
        with self._lock:
            self.backpressure_s += seconds
        if self._prom is not None:
            self._prom[1].labels("backpressure").inc(seconds)

    def export_to(self, registry) -> None:
        """Mirror the counters into a Prometheus registry from now on."""
        from prometheus_client import Counter

        self._prom = (
            Counter("musetalk_gfpgan_faces", "Decoded MuseTalk faces by outcome (enhanced, no_face, "
                    "fell_back) and fallback reason.", ["outcome", "reason"], registry=registry),
            Counter("musetalk_gfpgan_waiting_seconds", "Time MuseTalk waited: for answers when "
                    "reading faces, or for room before sending (backpressure).", ["why"],
                    registry=registry),
        )

    def as_dict(self) -> dict:
        with self._lock:
            return {"batches": self.batches, "faces": self.faces, "faces_enhanced": self.faces_enhanced,
                    "faces_no_face": self.faces_no_face, "faces_fell_back": self.faces_fell_back,
                    "fell_back": dict(self.fell_back), "waiting_s": round(self.waiting_s, 3),
                    "backpressure_s": round(self.backpressure_s, 3)}

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.fell_back.items()))
        return (f"GFPGAN summary: {self.faces} faces in {self.batches} batches; "
                f"{self.faces_enhanced} enhanced, {self.faces_no_face} without a face found, "
                f"{self.faces_fell_back} fell back" + (f" ({reasons})" if reasons else "")
                + f"; waited {self.waiting_s:.2f} s for answers and {self.backpressure_s:.2f} s "
                f"for room to send")

"""A circuit breaker per service target: stop paying the timeout on every batch while a
target is down, and let one probe batch through now and then to notice it is back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """When a target's circuit opens and how long it stays open."""

    #: Consecutive failed batches (timeout, unavailable, ...) that open the circuit.
    failure_threshold: int = 3
    #: Seconds the circuit stays open after it first opens.
    cooldown_s: float = 2.0
    #: Each failed probe doubles the cooldown, up to this many seconds.
    max_cooldown_s: float = 30.0
    #: Seconds, monotonic; tests pass a fake clock to step through cooldowns.
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self):
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1; got {self.failure_threshold}")
        if not 0 < self.cooldown_s <= self.max_cooldown_s:
            raise ValueError(
                f"need 0 < cooldown_s <= max_cooldown_s; got {self.cooldown_s} and {self.max_cooldown_s}")


class CircuitBreaker:
    """closed -> (failure_threshold failures) -> open -> (cooldown) -> half_open -> one probe.

    A successful probe closes the circuit; a failed one opens it again for twice as long.
    Every `allow()` that returns True must be followed by `record_success`,
    `record_failure` or `release` (the caller gave up without an answer).
    """

    def __init__(self, config: BreakerConfig = BreakerConfig()):
        self.config = config
        self._state = CLOSED
        self._failures = 0
        self._cooldown_s = config.cooldown_s
        self._open_until = 0.0
        self._probe_in_flight = False
        #: How many times the circuit has opened (for stats).
        self.times_opened = 0

    @property
    def state(self) -> str:
        if self._state == OPEN and self.config.clock() >= self._open_until:
            return HALF_OPEN
        return self._state

    @property
    def cooldown_s(self) -> float:
        """The cooldown the circuit opened with last (or will open with next)."""
        return self._cooldown_s

    def allow(self) -> bool:
        """May a batch go to this target now? In half_open, only the one probe may."""
        if self._state == CLOSED:
            return True
        if self._state == OPEN:
            if self.config.clock() < self._open_until:
                return False
            self._state = HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        self._state = CLOSED
        self._failures = 0
        self._cooldown_s = self.config.cooldown_s
        self._probe_in_flight = False

    def record_failure(self) -> bool:
        """Count a failed batch; True when this failure opened the circuit."""
        if self._state == HALF_OPEN:
            # The probe failed: the target is still down, wait longer before the next one.
            self._open(min(self._cooldown_s * 2, self.config.max_cooldown_s))
            return True
        if self._state == OPEN:
            # A batch sent before the circuit opened; it tells nothing new.
            return False
        self._failures += 1
        if self._failures >= self.config.failure_threshold:
            self._open(self.config.cooldown_s)
            return True
        return False

    def serving_again(self) -> None:
        """The target says it is SERVING (its health service): close the circuit now instead of
        waiting out the cooldown; failures will open it again if it is not so."""
        self.record_success()

    def release(self) -> None:
        """The admitted batch ended with no verdict (cancelled): free the probe slot."""
        self._probe_in_flight = False

    def _open(self, cooldown_s: float) -> None:
        self._state = OPEN
        self._cooldown_s = cooldown_s
        self._open_until = self.config.clock() + cooldown_s
        self._probe_in_flight = False
        self._failures = 0
        self.times_opened += 1

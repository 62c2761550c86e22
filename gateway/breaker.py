"""A per-expert circuit breaker: stop sending traffic to an expert that keeps failing.

closed --(N consecutive failures)--> open --(reset_after_s)--> half-open: one probe request;
probe succeeds -> closed, fails -> open again. Only one probe is in flight at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(self, failure_threshold: int, reset_after_s: float,
                 on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False
        self._on_change = on_change
        self._clock = clock

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a request go to this expert now? In half-open state, grants one probe."""
        if self._opened_at is None:
            return True
        if self._probe_in_flight or self._clock() - self._opened_at < self.reset_after_s:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        was_open = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._probe_in_flight = False
        if was_open and self._on_change:
            self._on_change(False)

    def record_failure(self) -> None:
        self._failures += 1
        if self._probe_in_flight or self._failures >= self.failure_threshold:
            was_open = self._opened_at is not None
            self._opened_at = self._clock()
            self._probe_in_flight = False
            if not was_open and self._on_change:
                self._on_change(True)

    def release_probe(self) -> None:
        """A probe ended without a verdict (e.g. the client left): let another probe through."""
        self._probe_in_flight = False

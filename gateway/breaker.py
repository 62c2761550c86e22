"""A per-expert circuit breaker: stop sending traffic to an expert that keeps failing.

closed --(N consecutive failures)--> open --(reset_after_s)--> half-open: one probe request;
probe answers -> closed, fails -> open again. Only one probe is in flight at a time.

The probe's verdict comes as soon as the expert shows it is answering (response headers, or the first
streamed chunk), not when its answer ends: a healthy 20 s stream must not keep everyone else on 503
for 20 s. A probe that never gets a verdict (its client left, or never reads, or the request was
refused before reaching the expert) expires after ``reset_after_s``, so the next request probes instead.
Only faults that say the expert is unhealthy are failures (``UpstreamError.expert_fault``).
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
        self._probe_since: float | None = None  # when the probe in flight was granted
        self._on_change = on_change
        self._clock = clock

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a request go to this expert now? In half-open state, grants one probe at a time."""
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self.reset_after_s:
            return False
        if self._probe_since is not None and now - self._probe_since < self.reset_after_s:
            return False  # a probe is in flight and has not expired
        self._probe_since = now
        return True

    def record_success(self) -> None:
        was_open = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._probe_since = None
        if was_open and self._on_change:
            self._on_change(False)

    def record_failure(self) -> None:
        self._failures += 1
        if self._probe_since is not None or self._failures >= self.failure_threshold:
            was_open = self._opened_at is not None
            self._opened_at = self._clock()
            self._probe_since = None
            if not was_open and self._on_change:
                self._on_change(True)

    def release_probe(self) -> None:
        """A probe ended without a verdict (e.g. the client left): let another probe through."""
        self._probe_since = None

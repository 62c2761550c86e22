"""One Redis back-off shared by the response cache and the rate limiter.

A Redis that is down or stalled must cost each request at most one short deadline, and then nothing
for ``seconds``: every user of that Redis skips it while the back-off lasts (the cache bypasses, the
rate limiter applies its outage policy). When it ends, *one* call probes Redis (for at most
``probe_s``, its deadline) while everyone else still skips it; the first call that succeeds ends the
outage, a failure starts another back-off. So a stalled Redis delays one request per back-off, not
every request in flight when the back-off ends. The outage is logged once, not per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("octoroute.redis")
BACKOFF_S = 1.0  # docs/reliability.md: the measurement behind it and cache.timeout_ms


class Backoff:
    def __init__(self, seconds: float, probe_s: float, on_error: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.probe_s = probe_s
        self._until = 0.0  # no Redis calls before this
        self._probe_until = 0.0  # a probe is in flight until this
        self._failing = False
        self._on_error = on_error
        self._clock = clock

    def allow(self) -> bool:
        """May this caller use Redis now? Call ``ok`` or ``trip`` with the outcome."""
        if not self._failing:
            return True
        now = self._clock()
        if now < self._until or now < self._probe_until:
            return False
        self._probe_until = now + self.probe_s
        return True

    def ok(self) -> None:
        """A call succeeded: Redis is back (if it was away)."""
        if self._failing:
            self._failing, self._probe_until = False, 0.0
            log.warning("redis answers again; cache and rate limiter use it again")

    def trip(self, op: str, exc: BaseException) -> None:
        """``op`` failed or missed its deadline: leave Redis alone for ``seconds``."""
        if not self._failing:
            log.warning("redis %s failed (%s: %s); not calling redis for %.1fs at a time until it answers", op,
                        type(exc).__name__, exc, self.seconds)
        self._failing, self._probe_until = True, 0.0
        self._until = self._clock() + self.seconds
        if self._on_error is not None:
            self._on_error()

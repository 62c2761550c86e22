"""One Redis back-off shared by the response cache and the rate limiter.

A Redis that is down or stalled must cost each request at most one short deadline, and then nothing
for ``seconds``: every user of that Redis skips it while the back-off lasts (the cache bypasses, the
rate limiter applies its outage policy), and the outage is logged once per back-off, not per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("octoroute.redis")
BACKOFF_S = 1.0  # docs/reliability.md: the measurement behind it and cache.timeout_ms


class Backoff:
    def __init__(self, seconds: float, on_error: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._until = 0.0
        self._on_error = on_error
        self._clock = clock

    @property
    def down(self) -> bool:
        """Inside a back-off: do not call Redis now."""
        return self._clock() < self._until

    def trip(self, op: str, exc: BaseException) -> None:
        """``op`` failed or missed its deadline: leave Redis alone for ``seconds``."""
        was_down = self.down
        self._until = self._clock() + self.seconds
        if not was_down:
            log.warning("redis %s failed (%s: %s); not calling redis for %.1fs", op, type(exc).__name__, exc,
                        self.seconds)
        if self._on_error is not None:
            self._on_error()

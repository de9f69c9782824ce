"""Per-API-key rate limit: a token bucket per key, in this process. The same buckets, keyed by client
address and charged only on failures (``peek`` first, ``hit`` after a failure), limit failed
authentications (``service.api.deps.check_auth_failures``).

Each key may make ``per_min`` requests a minute on average, and up to ``burst`` at once: its
bucket holds at most ``burst`` tokens, refills at ``per_min / 60`` tokens a second, and every
authenticated request takes one. An empty bucket answers 429 with ``Retry-After`` (whole seconds
until a token is back). The check is a dict lookup and a few float operations under a lock, on the
event loop: no I/O, so a status poll stays as cheap as it was.

The buckets live in the API process (no Redis round trip per request). With N API processes
(``uvicorn --workers N``, or N replicas) a key's effective limit is N times ``per_min`` (and
``burst``), as each process counts on its own. Buckets are keyed by the key's sha256, never the
plaintext, and bounded: past ``max_keys`` the least recently used bucket is dropped (that key
starts again from a full bucket).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

RATE_LIMIT_MAX_KEYS = 100_000


@dataclass(frozen=True)
class Decision:
    """The answer for one request: ``allowed``; when not, ``retry_after_s`` (> 0) until it would be."""

    allowed: bool
    retry_after_s: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, rounded up (at least 1)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiter:
    """Token buckets keyed by an opaque string (a key's hash). ``per_min <= 0`` allows everything."""

    def __init__(
        self,
        per_min: float,
        burst: int,
        max_keys: int = RATE_LIMIT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.per_min, self.burst, self.max_keys, self._clock = per_min, burst, max_keys, clock
        self.rate_per_s = per_min / 60.0
        # key -> (tokens, time they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_min > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def hit(self, key: str) -> Decision:
        """Take one token from ``key``'s bucket, or say how long until one is there."""
        if not self.enabled:
            return Decision(True)
        now = self._clock()
        with self._lock:
            entry = self._buckets.get(key)
            if entry is None:
                tokens = float(self.burst)
            else:
                tokens = min(float(self.burst), entry[0] + (now - entry[1]) * self.rate_per_s)
                self._buckets.move_to_end(key)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                allowed = True
            else:
                self._buckets[key] = (tokens, now)
                allowed = False
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        if allowed:
            return Decision(True)
        return Decision(False, (1.0 - tokens) / self.rate_per_s)

    def peek(self, key: str) -> Decision:
        """Whether ``key`` has a token now, taking none: for limits counted on failures only (the
        request is let through, or refused, before anyone knows whether it will fail)."""
        if not self.enabled:
            return Decision(True)
        now = self._clock()
        with self._lock:
            entry = self._buckets.get(key)
        if entry is None:
            return Decision(True)
        tokens = min(float(self.burst), entry[0] + (now - entry[1]) * self.rate_per_s)
        if tokens >= 1.0:
            return Decision(True)
        return Decision(False, (1.0 - tokens) / self.rate_per_s)

    def describe(self) -> str:
        """The limit in words, for error messages."""
        return f"{self.per_min:g} requests a minute per API key, in bursts of at most {self.burst}"

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()

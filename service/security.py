"""API keys: ``kt_<prefix>_<secret>``, stored as the sha256 of the whole key plus its prefix.

The prefix (8 hex chars) finds the candidate rows without a full-table scan; the hash decides,
compared in constant time. The plaintext is shown once, when the key is created.

``ApiKeyCache`` keeps, per API process, the keys that recently authenticated, for
``API_KEY_CACHE_TTL_S`` seconds (bounded, least recently used out first), so a client polling a
job's status does not cost a key lookup per request. The price: revoking a key, or deleting its
tenant, takes effect within ``API_KEY_CACHE_TTL_S`` seconds in every API process, not at once.
Only successes are cached; an unknown, malformed or revoked key is looked up every time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.db.models import API_KEY_PREFIX_LENGTH

KEY_SCHEME = "kt"
# How long an authenticated key is trusted without looking at the database again: the bound on
# how late a revocation (or a tenant's deletion) takes effect.
API_KEY_CACHE_TTL_S = 5.0
API_KEY_CACHE_MAX_ENTRIES = 10_000

T = TypeVar("T")


@dataclass(frozen=True)
class NewApiKey:
    key: str  # plaintext, shown once
    prefix: str
    key_hash: str


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> NewApiKey:
    prefix = secrets.token_hex(API_KEY_PREFIX_LENGTH // 2)
    key = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(key=key, prefix=prefix, key_hash=hash_api_key(key))


def api_key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key, or ``None`` when ``key`` is not shaped like one of ours."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[2]:
        return None
    prefix = parts[1]
    if len(prefix) != API_KEY_PREFIX_LENGTH or any(c not in "0123456789abcdef" for c in prefix):
        return None
    return prefix


def api_key_matches(key: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_api_key(key), key_hash)


class ApiKeyCache(Generic[T]):
    """A bounded, thread-safe TTL cache from API key to what it resolved to (e.g. its tenant).

    Entries are keyed by the key's sha256, never the plaintext. An entry is served for ``ttl_s``
    seconds after it was stored (reads do not extend it), then dropped; past ``max_entries`` the
    least recently used entry is evicted. ``ttl_s <= 0`` disables caching."""

    def __init__(
        self,
        ttl_s: float = API_KEY_CACHE_TTL_S,
        max_entries: int = API_KEY_CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[float, T]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> T | None:
        digest = hash_api_key(key)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if self._clock() >= entry[0]:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry[1]

    def put(self, key: str, value: T) -> None:
        if self.ttl_s <= 0:
            return
        digest = hash_api_key(key)
        expires = self._clock() + self.ttl_s
        with self._lock:
            self._entries[digest] = (expires, value)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, key: str) -> None:
        with self._lock:
            self._entries.pop(hash_api_key(key), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

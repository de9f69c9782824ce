"""API keys: ``kt_<prefix>_<secret>``, stored as the sha256 of the whole key plus its prefix.

The prefix (8 hex chars) finds the candidate rows without a full-table scan; the hash decides,
compared in constant time. The plaintext is shown once, when the key is created.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from service.db.models import API_KEY_PREFIX_LENGTH

KEY_SCHEME = "kt"


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

"""kt_train.cache_store: a content-addressed store's size cap and least-recently-used eviction,
which keeps entries being built (``.partial``) or in use (their locks held, here or in another
process), and the teacher-output cache's use of it (lease while read, eviction past the cap)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kt_train import cache_store
from kt_train.cache_store import Lease, entries, evict, exclusive, store_bytes, touch


def _entry(root: Path, key: str, nbytes: int, used: float, *, partial: bool = False) -> Path:
    """An entry of ``nbytes`` bytes (two files, one in a sub-folder) last used at ``used``."""
    d = root / (key + (".partial" if partial else ""))
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"x" * (nbytes // 2))
    (d / "sub" / "b.bin").write_bytes(b"y" * (nbytes - nbytes // 2))
    os.utime(d, (used, used))
    return d


def _keys(root: Path) -> list[str]:
    return [e.key for e in entries(root) if e.complete]


def test_entries_are_listed_least_recently_used_first_with_their_bytes(tmp_path: Path) -> None:
    now = time.time()
    _entry(tmp_path, "new", 100, now)
    _entry(tmp_path, "old", 300, now - 100)
    _entry(tmp_path, "mid", 200, now - 50, partial=True)
    (tmp_path / "old.lock").touch()  # lock files are not entries
    found = entries(tmp_path)
    assert [(e.key, e.bytes, e.complete) for e in found] == [
        ("old", 300, True),
        ("mid", 200, False),
        ("new", 100, True),
    ]
    assert store_bytes(tmp_path) == 600
    assert entries(tmp_path / "missing") == [] and evict(tmp_path / "missing", 1) == []


def test_evicts_least_recently_used_until_under_the_cap(tmp_path: Path) -> None:
    now = time.time()
    for i, key in enumerate(["a", "b", "c", "d"]):  # a oldest ... d newest, 100 bytes each
        _entry(tmp_path, key, 100, now - 100 + i * 10)
    assert evict(tmp_path, None) == [] and evict(tmp_path, 0) == []  # no cap
    assert evict(tmp_path, 400) == []  # at the cap: nothing goes
    touch(tmp_path / "a")  # used now: a is the most recent, b the least
    assert evict(tmp_path, 250) == ["b", "c"]
    assert sorted(_keys(tmp_path)) == ["a", "d"] and store_bytes(tmp_path) == 200
    assert not list(tmp_path.glob("*.evicting-*"))
    assert evict(tmp_path, 1) == ["d", "a"]  # down to nothing, oldest first
    assert _keys(tmp_path) == []


def test_an_entry_in_use_or_being_checked_is_kept(tmp_path: Path) -> None:
    now = time.time()
    _entry(tmp_path, "read", 100, now - 300)
    _entry(tmp_path, "checked", 100, now - 200)
    _entry(tmp_path, "free", 100, now - 100)
    with Lease.take(tmp_path, "read") as lease, exclusive(tmp_path, "checked"):
        assert lease.held
        # over the cap by 200: the two oldest are held, so the newest goes, and the store stays over
        assert evict(tmp_path, 100) == ["free"]
        assert sorted(_keys(tmp_path)) == ["checked", "read"]
    assert not lease.held
    assert evict(tmp_path, 100) == ["read"]  # released: the oldest goes now
    assert _keys(tmp_path) == ["checked"]


def test_a_lease_held_by_another_process_keeps_the_entry(tmp_path: Path) -> None:
    _entry(tmp_path, "shared", 100, time.time() - 100)
    code = (
        "import sys, time; from kt_train.cache_store import Lease; "
        f"lease = Lease.take({str(tmp_path)!r}, 'shared'); print('held', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert evict(tmp_path, 1) == [] and _keys(tmp_path) == ["shared"]
    finally:
        proc.communicate("", timeout=30)
    assert evict(tmp_path, 1) == ["shared"]


def test_a_partial_build_is_kept_and_counts_toward_the_cap(tmp_path: Path) -> None:
    now = time.time()
    _entry(tmp_path, "building", 500, now - 1000, partial=True)  # the oldest, and the biggest
    _entry(tmp_path, "old", 100, now - 100)
    _entry(tmp_path, "new", 100, now)
    assert evict(tmp_path, 600) == ["old"]  # 700 > 600: the oldest complete entry goes
    assert (tmp_path / "building.partial").is_dir() and _keys(tmp_path) == ["new"]
    assert evict(tmp_path, 100) == ["new"]  # still over: the partial stays all the same
    assert [e.key for e in entries(tmp_path)] == ["building"]


def test_an_entry_used_since_the_listing_is_not_evicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    _entry(tmp_path, "a", 100, now - 100)
    _entry(tmp_path, "b", 100, now - 50)
    listed = cache_store.entries(tmp_path)
    touch(tmp_path / "a")  # opened by another run after the evictor listed the store
    monkeypatch.setattr(cache_store, "entries", lambda root: listed)
    assert evict(tmp_path, 100) == ["b"]
    assert (tmp_path / "a").is_dir()


def test_a_deletion_cut_short_is_cleaned_up(tmp_path: Path) -> None:
    left = tmp_path / "k.evicting-1-2"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "x").write_bytes(b"x")
    assert entries(tmp_path) == []  # not an entry
    evict(tmp_path, 10)
    assert not left.exists()

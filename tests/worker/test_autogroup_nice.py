"""The worker lowers its session's autogroup niceness, not only its own (worker.tasks.autogroup_nice)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.tasks import autogroup_nice


def _group(tmp_path: Path, nice: int) -> Path:
    path = tmp_path / "autogroup"
    path.write_text(f"/autogroup-42 nice {nice}\n")
    return path


def test_a_session_leader_gives_its_session_the_niceness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "getsid", lambda _pid: os.getpid())
    path = _group(tmp_path, 0)
    assert autogroup_nice(19, str(path)) is True
    assert path.read_text() == "19"


def test_a_session_already_nicer_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getsid", lambda _pid: os.getpid())
    path = _group(tmp_path, 19)
    assert autogroup_nice(10, str(path)) is True
    assert path.read_text() == "/autogroup-42 nice 19\n"


def test_a_worker_inside_another_session_does_not_touch_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "getsid", lambda _pid: os.getpid() + 1)
    path = _group(tmp_path, 0)
    assert autogroup_nice(19, str(path)) is False
    assert path.read_text() == "/autogroup-42 nice 0\n"


def test_no_autogroup_file_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getsid", lambda _pid: os.getpid())
    assert autogroup_nice(19, str(tmp_path / "missing")) is False

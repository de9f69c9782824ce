"""Leftovers of interrupted work under ``Settings.data_dir``, and their removal.

A process killed mid-request (``kill -9``, OOM, power loss) leaves files that nothing else would
ever remove. None of them is ever visible through the API (a dataset is listed only once its row
is committed, and its directory appears by one rename of a complete staging directory), but they
take disk space. ``sweep`` removes them; the API runs it at start and then every
``SWEEP_INTERVAL_S`` (``service.app``):

- ``<data_dir>/tmp/upload~<host>~<pid>~<start>~*.zip``: an upload being received, then ingested.
  The name says which process owns it (host, pid and the pid's start time, so a reused pid is not
  taken for the owner): a file whose owner on this host is gone is removed at once. Files written
  by another host (a data dir shared between machines) are judged by age only: removed once older
  than ``ORPHAN_AGE_S``. So are files named otherwise (``upload-*.zip``, from older versions).
- ``<data_dir>/tenants/*/datasets/.staging-*``: a dataset being extracted. Every ingest keeps its
  upload file until it ends, so when no upload is in progress on this host (and none from another
  host is recent), a staging directory older than the sweep's start is abandoned and removed (``GRACE_S``); any
  staging directory older than ``ORPHAN_AGE_S`` is removed as well.
- ``<data_dir>/tenants/*/datasets/.deleting-*``: a deletion that was cut short; removed.

Not handled: a dataset directory published by a process killed between the rename and the commit
of its row. It is invisible (no row) and stays on disk.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ORPHAN_AGE_S = 24 * 3600.0
SWEEP_INTERVAL_S = 600.0
# a staging directory must predate the sweep by this much (file times are coarser than the clock)
GRACE_S = 0.5
UPLOAD_PATTERN = re.compile(r"^upload~(?P<host>[^~]+)~(?P<pid>\d+)~(?P<start>\d+)~")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or
    ``None`` when there is no such process (or no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return fields[19] if len(fields) > 19 else None


def upload_prefix() -> str:
    """The temp-file prefix for an upload received by this process (see the module docstring)."""
    pid = os.getpid()
    return f"upload~{_host()}~{pid}~{_start_time(pid) or 0}~"


@dataclass
class SweepResult:
    removed: list[Path] = field(default_factory=list)
    kept_uploads: int = 0  # uploads in progress


def _age_s(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _owner_alive(name: str, host: str, now: float, path: Path) -> bool:
    match = UPLOAD_PATTERN.match(name)
    if match is None or match["host"] != host:
        return _age_s(path, now) <= ORPHAN_AGE_S
    start = _start_time(int(match["pid"]))
    if start is None:
        return False
    # "0": the owner could not read its own start time (no /proc); trust the pid alone
    return match["start"] == "0" or start == match["start"]


def sweep(data_dir: Path, now: float | None = None) -> SweepResult:
    """Remove what interrupted uploads and deletions left under ``data_dir`` (see the module docstring)."""
    now = time.time() if now is None else now
    result = SweepResult()
    host = _host()
    tmp = data_dir / "tmp"
    for path in sorted(tmp.glob("upload*")) if tmp.is_dir() else []:
        if not path.is_file():
            continue
        if _owner_alive(path.name, host, now, path):
            result.kept_uploads += 1
            continue
        try:
            path.unlink()
            result.removed.append(path)
        except FileNotFoundError:
            pass  # its owner finished with it meanwhile
        except OSError as err:
            log.warning("cleanup: can't remove %s: %s", path, err)
    for path in data_dir.glob("tenants/*/datasets/.*"):
        if not path.is_dir() or path.is_symlink():
            continue
        if path.name.startswith(".deleting-"):
            doomed = True
        elif path.name.startswith(".staging-"):
            age = _age_s(path, now)
            doomed = age > ORPHAN_AGE_S or (result.kept_uploads == 0 and age > GRACE_S)
        else:
            doomed = False
        if doomed:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                result.removed.append(path)
    if result.removed:
        log.info("cleanup: removed %d leftover(s) of interrupted uploads/deletions", len(result.removed))
    return result

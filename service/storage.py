"""Where artifacts live under ``Settings.data_dir``, and moving them in and out atomically.

Layout::

    <data_dir>/tmp/                                   uploads being received
    <data_dir>/tenants/<tenant_id>/datasets/<id>/images/<class>/<file>

A dataset directory appears by ``os.replace`` of a finished staging directory, so a reader never
sees a half-written one; it disappears by a rename to a hidden name followed by removal.

Everything under the data dir is private to the service's user (``secure_data_dir``): it holds
every tenant's images and the databases, and a host's default umask (022) would leave them
readable by every local account.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from service.db.models import new_id

log = logging.getLogger(__name__)
PRIVATE_UMASK = 0o077  # files 0600, folders 0700
# Depth below the data dir whose modes are fixed at startup: the databases and logs a launcher
# (``kt admin``, ``service.serve``) may have made before the umask was set, and the top folders.
# Deeper entries written by an older version keep their bits, unreachable through the 0700 data
# dir; ``chmod -R go= $KT_DATA_DIR`` clears them too.
TIGHTEN_DEPTH = 2


def secure_data_dir(data_dir: Path) -> None:
    """At the start of an API or worker process: umask 077 for everything it writes from now on,
    the data dir created 0700 (or made so), and group/other bits cleared from what lies within
    ``TIGHTEN_DEPTH`` of it. A data dir this user may not chmod (a mount owned by someone else)
    is said in the log, not fatal."""
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_private(data_dir)
    _tighten_below(data_dir, TIGHTEN_DEPTH)


def _make_private(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode) or not mode & 0o077:
            return
        os.chmod(path, stat.S_IMODE(mode) & ~0o077)
    except OSError as err:
        log.warning("could not make %s private to this user (%s); run `chmod go= %s`", path, err, path)


def _tighten_below(folder: Path, depth: int) -> None:
    if depth <= 0:
        return
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        _make_private(Path(entry.path))
        if entry.is_dir(follow_symlinks=False):
            _tighten_below(Path(entry.path), depth - 1)


def tmp_dir(data_dir: Path) -> Path:
    path = data_dir / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def datasets_dir(data_dir: Path, tenant_id: str) -> Path:
    return data_dir / "tenants" / tenant_id / "datasets"


def dataset_dir(data_dir: Path, tenant_id: str, dataset_id: str) -> Path:
    return datasets_dir(data_dir, tenant_id) / dataset_id


def publish(staging: Path, final: Path) -> None:
    """Make ``staging`` visible as ``final`` in one step."""
    os.replace(staging, final)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (if present): first renamed aside so it vanishes at once, then deleted."""
    if not path.exists():
        return
    doomed = path.with_name(f".deleting-{path.name}-{new_id()[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)

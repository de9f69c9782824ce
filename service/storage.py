"""Where artifacts live under ``Settings.data_dir``, and moving them in and out atomically.

Layout::

    <data_dir>/tmp/                                   uploads being received
    <data_dir>/tenants/<tenant_id>/datasets/<id>/images/<class>/<file>

A dataset directory appears by ``os.replace`` of a finished staging directory, so a reader never
sees a half-written one; it disappears by a rename to a hidden name followed by removal.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from service.db.models import new_id


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

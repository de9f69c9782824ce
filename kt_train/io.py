"""Atomic file writes and the stage-completion marker.

A stage may be killed at any instant (a worker crash, a redelivered task). Every file is written to a
temp name and ``os.replace``d, and ``_SUCCESS`` is written last, so a reader sees either nothing or
a complete result.

A full disk is reported as ``DiskFullError`` (an ``OSError`` with errno ``ENOSPC`` and the file
that was being written, and a ``KTError``: retrying does not help until space is freed); the
partial temp file is removed, so a full disk never leaves a truncated file under a final name.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import KTError

SUCCESS = "_SUCCESS"
OUTPUTS = "outputs.json"


class DiskFullError(OSError, KTError):
    """No space left on the device while writing ``filename`` (errno ``ENOSPC``)."""

    def __init__(self, path: str | Path, cause: BaseException | None = None) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.cause = cause

    def __str__(self) -> str:
        return f"no space left on device while writing {self.filename}; free space on that disk and run again"


def is_disk_full(err: BaseException) -> bool:
    """``err`` (or an error it was raised from) says the disk is full: an ``OSError`` with errno
    ``ENOSPC``, or a library's wrapper whose message carries it (safetensors, torch)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return True
        text = str(cur)
        if "No space left on device" in text or "os error 28" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, DiskFullError) and is_disk_full(err):
            raise DiskFullError(path, err) from err
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    data = text.encode()

    def write(f: IO[bytes]) -> None:
        f.write(data)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def is_done(out_dir: str | Path) -> bool:
    return (Path(out_dir) / SUCCESS).exists()


def read_outputs(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / OUTPUTS).read_text())


def mark_done(out_dir: str | Path, outputs: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(Path(out_dir) / OUTPUTS, outputs)
    atomic_write_text(Path(out_dir) / SUCCESS, "")
    return outputs

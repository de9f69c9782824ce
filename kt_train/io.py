"""Atomic file writes and the stage-completion marker.

A stage may be killed at any instant (a worker crash, a redelivered task). Every file is written to a
temp name and ``os.replace``d, and ``_SUCCESS`` is written last, so a reader sees either nothing or
a complete result.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

SUCCESS = "_SUCCESS"
OUTPUTS = "outputs.json"


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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

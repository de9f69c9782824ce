"""TensorBoard curves beside ``history.json``: every training loop writes the rows it adds to its
history (step, ``loss``, ``lr`` and whatever its step reports, e.g. ``acc``) as scalars to an event
file in ``<stage dir>/tensorboard/<loop>/``, as it trains (``tensorboard --logdir runs/x``).

Optional: nothing is written when the ``tensorboard`` package is not installed
(``pip install 'vfm-kt[tensorboard]'``) or ``KT_TENSORBOARD=0``. A resumed loop starts its event
file over from the history its checkpoint carried (rows an interrupted run wrote past the checkpoint
would otherwise stay as a second curve), so the curves always match ``history.json``; the rows from
before the resume then carry the resume's wall time.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
OFF = ("0", "false", "no", "off")
FLUSH_S = 30


def enabled() -> bool:
    return os.environ.get("KT_TENSORBOARD", "1").strip().lower() not in OFF


def run_name(task: str) -> str:
    """A loop's folder name: ``teacher linear probe`` -> ``teacher_linear_probe``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("_") or "loop"


class ScalarLog:
    """Writes history rows of one loop; a no-op without TensorBoard (``writer`` is then None)."""

    def __init__(self, log_dir: Path, history: list[dict[str, Any]] | None = None) -> None:
        """``history``: the rows a resumed loop already has (written again, into a new file)."""
        self.writer: Any = None
        if not enabled():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: history.json only
            return
        try:
            for old in Path(log_dir).glob("events.out.tfevents.*"):
                old.unlink()
            self.writer = SummaryWriter(str(log_dir), flush_secs=FLUSH_S)
        except OSError as err:  # curves are a convenience: never fail training for them
            log.warning("no TensorBoard curves in %s: %s", log_dir, err)
            return
        for row in history or []:
            self.add(row)

    @classmethod
    def off(cls) -> ScalarLog:
        """One that writes nothing (a loop's other ranks)."""
        return cls.__new__(cls)._no_writer()

    def _no_writer(self) -> ScalarLog:
        self.writer = None
        return self

    def add(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` of the event files in ``log_dir`` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

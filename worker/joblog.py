"""A job's log file: ``<data_dir>/jobs/<job_id>/job.log``, which ``GET /v1/jobs/{id}/logs`` serves.

The worker appends one timestamped line per event (attempt start, stage start/finish, progress,
errors with their traceback, the final status); ``JobLog.capture`` adds the log records that
``kt_train`` emits while the job runs in this thread (shards embedded, indexes built, ...).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.db.models import utcnow
from service.settings import Settings

log = logging.getLogger(__name__)
JOB_LOG = "job.log"


def job_log_path(settings: Settings, job_id: str) -> Path:
    """Where the API's logs route reads a job's log (``service.api.routes.jobs.job_dir``)."""
    return Path(settings.data_dir) / "jobs" / job_id / JOB_LOG


class JobLog:
    """Appends timestamped lines to a job's log file (opened per write: writes are rare, and a
    reader or a log rotation never holds a stale handle)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, message: str) -> None:
        stamp = f"{utcnow():%Y-%m-%d %H:%M:%S}Z"
        lines = message.rstrip("\n").splitlines() or [""]
        text = f"{stamp} {lines[0]}\n" + "".join(f"    {line}\n" for line in lines[1:])
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as err:  # a full disk must not turn a job's bookkeeping into a crash
                log.warning("job log %s not written (%s): %s", self.path, err, lines[0])

    @contextmanager
    def capture(self, *loggers: str, level: int = logging.INFO) -> Iterator[None]:
        """Copy records of ``loggers`` (default ``kt_train``) logged by this thread into the file."""
        handler = _JobLogHandler(self, threading.get_ident())
        handler.setLevel(level)
        targets = [logging.getLogger(name) for name in (loggers or ("kt_train",))]
        saved = [target.level for target in targets]
        for target in targets:
            target.addHandler(handler)
            if target.getEffectiveLevel() > level:
                target.setLevel(level)
        try:
            yield
        finally:
            for target, old in zip(targets, saved, strict=True):
                target.removeHandler(handler)
                target.setLevel(old)


class _JobLogHandler(logging.Handler):
    def __init__(self, joblog: JobLog, thread_id: int) -> None:
        super().__init__()
        self.joblog = joblog
        self.thread_id = thread_id
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread_id:  # another job's thread, or the heartbeat
            return
        try:
            self.joblog.write(self.format(record))
        except Exception:  # a full disk must not fail the job from inside a log call
            self.handleError(record)

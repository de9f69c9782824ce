"""Intra-op threads per process, sized on purpose.

torch's default (one thread per core) collapses when anything else uses the cores: a student step
measured 154 img/s with 1 thread and did not finish 13 steps in 60 s with 2 threads on a loaded
2-core machine (BLAS threads spin waiting for cores another process holds). So every process that
trains sizes its threads explicitly:

- ``KT_THREADS=N`` wins everywhere (``kt train``, workers, benchmarks), then ``OMP_NUM_THREADS``;
- otherwise a process that shares the machine with ``processes`` others (worker concurrency,
  parallel benchmark seeds) takes ``cores // processes`` threads, at least one;
- ``kt train --threads N`` sets it for one run.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_count(threads: int | None = None, *, processes: int = 1) -> int:
    """The intra-op thread count for one of ``processes`` processes sharing this machine."""
    if threads is None:
        # KT_THREADS, else an OMP_NUM_THREADS the process was started with (an explicit choice
        # torch already follows: never raise it behind the caller's back)
        for name in ("KT_THREADS", "OMP_NUM_THREADS"):
            env = os.environ.get(name, "").strip()
            if env:
                try:
                    threads = int(env)
                except ValueError:
                    raise ValueError(f"{name} must be a positive integer, got {env!r}") from None
                break
    if threads is not None:
        if threads < 1:
            raise ValueError(f"thread count must be >= 1, got {threads}")
        return threads
    return max(1, usable_cores() // max(1, processes))


def configure_threads(threads: int | None = None, *, processes: int = 1) -> int:
    """Set torch's intra-op threads for this process (see the module doc); returns the count."""
    import torch

    n = thread_count(threads, processes=processes)
    torch.set_num_threads(n)
    log.info("torch intra-op threads: %d (%d usable cores, %d process(es))", n, usable_cores(), processes)
    return n

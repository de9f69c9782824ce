"""Mixed load (issue 5, part 5): status pollers, uploads and running jobs at the same time.

Its own uvicorn API process (production shape, the default per-key rate limit on) and two Celery
worker processes (``--pool solo``, queue ``cpu``, one torch thread each) on the benchmark's
PostgreSQL database and Redis broker; everything on loopback, on this machine:

- ``pollers`` clients (200) polling job status, each with its own API key and its own keep-alive
  connection, ``rate`` GETs a second in all (200: each client once a second), open loop
  (``loadgen.py``, every connection kept in use); the jobs polled are the ones training;
- ``uploaders`` clients (5), each with its own key, uploading a ``upload_mb`` zip (random-noise
  PNGs) again and again, deleting each dataset once it is stored (so the disk does not fill); an
  upload the API refuses for want of a turn (503 + ``Retry-After``) is sent again after the wait,
  as ``kt_client`` does, and counted (not an error);
- ``jobs`` training jobs (tiny timm models, as the end-to-end test uses) queued at the start, two
  running at any time (one per worker) until the queue drains; a watcher polls them every second.

The pollers' generator runs alone in the benchmark's process; the uploaders and the watcher run
in a child process (so polls never wait for the GIL behind the uploaders' threads).

Recorded: errors (any status but the expected one, or a failed request), status p50/p90/p99,
uploads done and MB/s (all uploaders together, and per upload), jobs finished (succeeded) and
failed in the window, how many were running when sampled, and CPU by process group (API, workers,
generator, uploaders, PostgreSQL, anything else). ``run.py --mixed`` runs this after
the standard phases and writes it under ``mixed`` in ``bench/results/service.{json,md}``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import open_loop, pct

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
# the end-to-end test's models (random init, no download): a tiny ViT teacher, a tiny EfficientNet
JOB_BODY: dict[str, Any] = {
    "teacher": "timm:test_vit",
    "student": "timm:test_efficientnet",
    "image_size": 32,
    "export_formats": ["safetensors"],
    "device": "cpu",
}


@dataclass
class MixedConfig:
    duration: float = 60.0
    rate: float = 200.0
    pollers: int = 200
    uploaders: int = 5
    upload_mb: float = 4.0
    jobs: int = 12
    steps: tuple[int, int, int] = (30, 400, 30)  # finetune_teacher, distill, finetune_student
    workers: int = 2
    worker_nice: int = 0  # > 0: the workers run at a lower CPU priority than the API
    # Linux autogroups (/proc/sys/kernel/sched_autogroup_enabled): each worker runs in a session of its
    # own (as under `kt serve`), and the kernel shares the CPU between sessions by the session's
    # niceness, whatever the niceness of the processes in it (their KT_WORKER_NICE): not None, the
    # workers' sessions take this niceness, as if KT_WORKER_NICE reached across sessions
    worker_autogroup_nice: int | None = None
    api_workers: int = 1  # uvicorn --workers


@dataclass
class UploadStats:
    done: int = 0
    busy: int = 0  # answered 503 + Retry-After (every upload turn taken): sent again after the wait
    bytes: int = 0
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def session_nice(pid: int, nice: int | None = None) -> None:
    """Give the session that ``pid`` leads (started with ``start_new_session``) the niceness ``nice``,
    by default this process's own. With Linux autogroups the kernel shares the CPU between sessions
    first and a process's niceness counts only inside its session, so a benchmark started with
    ``nice -n 10`` would otherwise run its API and workers at full priority beside other work."""
    if nice is None:
        nice = os.nice(0)
        if nice == 0:
            return
    with contextlib.suppress(OSError):  # no autogroups here: niceness works as it says
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


@contextlib.contextmanager
def processes(
    cmds: list[list[str]], env: dict[str, str], logs: list[Path]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    handles = []
    try:
        for cmd, log in zip(cmds, logs, strict=True):
            fh = open(log, "wb")  # noqa: SIM115 - closed below
            handles.append(fh)
            cmd_proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            procs.append(cmd_proc)
            session_nice(cmd_proc.pid)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # what it started and left behind in its session (the API's ingest processes survive it)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for fh in handles:
            fh.close()


def uploader(
    base: str, key: str, path: Path, stop: threading.Event, stats: UploadStats, lock: threading.Lock
) -> None:
    from run import upload  # the standard phase's streaming multipart upload

    size = path.stat().st_size
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                resp = upload(client, path)
            except httpx.HTTPError as err:
                with lock:
                    stats.errors.append(f"upload: {type(err).__name__}")
                continue
            took = time.perf_counter() - t
            if resp.status_code == 503 and "Retry-After" in resp.headers:  # as kt_client does
                with lock:
                    stats.busy += 1
                stop.wait(float(resp.headers["Retry-After"]))
                continue
            if resp.status_code != 201:
                with lock:
                    stats.errors.append(f"upload: HTTP {resp.status_code} {resp.text[:200]}")
                continue
            with lock:
                stats.done += 1
                stats.bytes += size
                stats.seconds.append(took)
            try:
                gone = client.delete(f"/v1/datasets/{resp.json()['id']}")
                if gone.status_code != 204:
                    with lock:
                        stats.errors.append(f"delete: HTTP {gone.status_code} {gone.text[:200]}")
            except httpx.HTTPError as err:
                with lock:
                    stats.errors.append(f"delete: {type(err).__name__}")


def side_load(
    base: str,
    upload_keys: list[str],
    admin_key: str,
    job_ids: list[str],
    upload_zip: Path,
    duration: float,
    report: Any,
) -> None:
    """(In a child process) the uploaders and the job watcher for ``duration`` s; sends
    ``(UploadStats, watched)`` through the ``report`` pipe end."""
    stop = threading.Event()
    lock = threading.Lock()
    ups = UploadStats()
    watched: dict[str, Any] = {}
    threads = [
        threading.Thread(target=uploader, args=(base, k, upload_zip, stop, ups, lock), daemon=True)
        for k in upload_keys
    ]
    threads.append(
        threading.Thread(target=watch_jobs, args=(base, admin_key, job_ids, stop, watched), daemon=True)
    )
    for th in threads:
        th.start()
    time.sleep(duration)
    stop.set()
    for th in threads:
        th.join(timeout=150)
    watched["cpu_s"] = time.process_time()  # this process, all its threads
    report.send((ups, watched))


def client_submit(base: str, key: str, body: dict[str, Any]) -> str:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        resp = client.post("/v1/jobs", json=body)
        if resp.status_code != 202:
            raise SystemExit(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:2000]}")
        return str(resp.json()["id"])


def watch_jobs(base: str, key: str, job_ids: list[str], stop: threading.Event, out: dict[str, Any]) -> None:
    """Every second: each job's status; records the running counts seen and when jobs finished."""
    running_seen: list[int] = []
    status: dict[str, str] = {}
    errors: list[str] = []
    t0 = time.monotonic()
    finished_at: dict[str, float] = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        while not stop.wait(1.0):
            for job_id in job_ids:
                try:
                    resp = client.get(f"/v1/jobs/{job_id}")
                except httpx.HTTPError as err:
                    errors.append(f"watch: {type(err).__name__}")
                    continue
                if resp.status_code != 200:
                    errors.append(f"watch: HTTP {resp.status_code}")
                    continue
                status[job_id] = resp.json()["status"]
                if status[job_id] in ("succeeded", "failed", "canceled") and job_id not in finished_at:
                    finished_at[job_id] = round(time.monotonic() - t0, 1)
            running_seen.append(sum(s == "running" for s in status.values()))
    out.update(running_seen=running_seen, status=status, errors=errors, finished_at=finished_at)


def run_mixed(
    cfg: MixedConfig,
    *,
    tmp: Path,
    env: dict[str, str],
    port: int,
    keys: list[str],
    train_zip: Path,
    upload_zip: Path,
    wait_ready: Any,
) -> dict[str, Any]:
    """The mixed phase; ``keys``: at least pollers + uploaders + 1 keys of one tenant."""
    assert len(keys) >= cfg.pollers + cfg.uploaders + 1
    base = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    api_cmd = [
        str(bin_dir / "uvicorn"), "--factory", "service.app:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(cfg.api_workers),
    ]  # fmt: skip
    worker_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    worker_cmd = [
        *(["nice", "-n", str(cfg.worker_nice)] if cfg.worker_nice else []),
        sys.executable, "-m", "celery", "-A", "worker.app:celery_app", "worker", "-Q", "cpu",
        "--pool", "solo", "-c", "1", "--loglevel", "INFO",
    ]  # fmt: skip
    worker_cmds = [[*worker_cmd, "-n", f"bench{i}-{port}@%h"] for i in range(cfg.workers)]
    admin_key, poll_keys, upload_keys = keys[0], keys[1 : 1 + cfg.pollers], keys[1 + cfg.pollers :]
    logs = [tmp / "mixed-api.log", *(tmp / f"mixed-worker{i}.log" for i in range(cfg.workers))]
    with (
        processes([api_cmd], env, logs[:1]) as (api,),
        processes(worker_cmds, worker_env, logs[1:]) as workers,
    ):
        if cfg.worker_autogroup_nice is not None:
            for proc in workers:
                session_nice(proc.pid, cfg.worker_autogroup_nice)
        wait_ready(f"{base}/readyz", api, logs[0])
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60
        ) as client:
            resp = client.post(
                "/v1/datasets", files={"file": (train_zip.name, train_zip.read_bytes(), "application/zip")}
            )
            if resp.status_code != 201:
                raise SystemExit(f"training dataset upload answered {resp.status_code}: {resp.text[:2000]}")
            dataset_id = resp.json()["id"]
            t, d, s = cfg.steps
            body = {
                **JOB_BODY,
                "dataset_id": dataset_id,
                "steps": {"finetune_teacher": t, "distill": d, "finetune_student": s},
            }
            job_ids: list[str] = []
            for _ in range(cfg.jobs if cfg.workers else 0):
                resp = client.post("/v1/jobs", json=body)
                if resp.status_code != 202:
                    raise SystemExit(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:2000]}")
                job_ids.append(resp.json()["id"])
            print(f"mixed: {cfg.jobs} jobs queued; waiting for {cfg.workers} to run ...", flush=True)
            deadline = time.monotonic() + 180
            while job_ids:
                states = [client.get(f"/v1/jobs/{j}").json()["status"] for j in job_ids]
                if states.count("running") >= min(cfg.workers, cfg.jobs):
                    break
                if any(p.poll() is not None for p in workers) or time.monotonic() > deadline:
                    tails = "\n".join(log.read_text()[-3000:] for log in logs[1:])
                    raise SystemExit(f"jobs not running ({states}); worker logs:\n{tails}")
                time.sleep(0.5)

        # the pollers poll the jobs in order: those running first, then those queued behind them
        if not job_ids:  # no worker: poll a job that stays queued
            job_ids = [client_submit(base, admin_key, body)]
        variants = [
            (f"{base}/v1/jobs/{job_ids[i % len(job_ids)]}", {"Authorization": f"Bearer {k}"})
            for i, k in enumerate(poll_keys)
        ]
        print(
            f"mixed: {cfg.duration:g} s: {cfg.pollers} pollers at {cfg.rate:g} req/s, {cfg.uploaders} uploaders "
            f"of {upload_zip.stat().st_size / MB:.1f} MB, {cfg.workers} jobs running ...",
            flush=True,
        )
        from run import cpu_by_group, machine_cpu_busy, process_table, tree_pids

        # uploaders and the job watcher in another process: the generator's process runs nothing else
        # (its latencies would otherwise include waits for the GIL behind the uploaders' threads)
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe(duplex=False)
        side = ctx.Process(
            target=side_load,
            args=(
                base,
                upload_keys[: cfg.uploaders],
                admin_key,
                job_ids,
                upload_zip,
                cfg.duration,
                child_end,
            ),
            daemon=True,
        )
        loadavg_before = os.getloadavg()
        table0, busy0 = process_table(), machine_cpu_busy()
        wall0 = time.monotonic()
        side.start()
        status = open_loop(
            variants[0][0], variants[0][1], cfg.rate, cfg.duration, pool=cfg.pollers,
            variants=variants, fifo=True, warm_conns=cfg.pollers,
        )  # fmt: skip
        ups, watched = parent_end.recv() if parent_end.poll(180) else (UploadStats(errors=["no report"]), {})
        side.join(timeout=30)
        window = time.monotonic() - wall0
        busy1, table1 = machine_cpu_busy(), process_table()
        ours = {
            "api": tree_pids(api.pid),
            "celery workers": set().union(*(tree_pids(p.pid) for p in workers)),
            "load generator (pollers)": {os.getpid()},
        }
        groups = cpu_by_group(table0, table1, window, ours)
        groups["uploaders + job watcher (clients)"] = watched.get("cpu_s", 0.0) / window
        cpu = {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v >= 0.01}
        machine_busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * (os.cpu_count() or 1)
        loadavg_after = os.getloadavg()
        api_alive = api.poll() is None
        workers_alive = sum(p.poll() is None for p in workers)

        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60
        ) as client:
            final = {j: client.get(f"/v1/jobs/{j}").json() for j in job_ids}
            for j, job in final.items():
                if job["status"] in ("queued", "running"):
                    client.post(f"/v1/jobs/{j}/cancel")
    by_status: dict[str, int] = {}
    for job in final.values():
        by_status[job["status"]] = by_status.get(job["status"], 0) + 1
    failed = {j: (job.get("error") or "")[:300] for j, job in final.items() if job["status"] == "failed"}
    errors = status["errors"] + len(ups.errors) + len(watched.get("errors", [])) + len(failed)
    running = watched.get("running_seen", [])
    return {
        "duration_s": cfg.duration,
        "window_s": round(window, 1),
        "errors": errors,
        "status": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in status.items()},
        "status_p50_ms": round(status["p50_ms"], 2),
        "status_p99_ms": round(status["p99_ms"], 2),
        "status_rps": round(status["rps"], 1),
        "pollers": cfg.pollers,
        "uploaders": cfg.uploaders,
        "upload_mb": round(upload_zip.stat().st_size / MB, 2),
        "uploads_done": ups.done,
        "upload_mb_s": round(ups.bytes / MB / window, 1),
        "upload_s_p50": round(statistics.median(ups.seconds), 2) if ups.seconds else None,
        "upload_s_p99": round(pct(ups.seconds, 99), 2) if ups.seconds else None,
        "upload_errors": ups.errors[:20],
        "uploads_refused_busy": ups.busy,
        "jobs": cfg.jobs,
        "job_steps": {
            "finetune_teacher": cfg.steps[0],
            "distill": cfg.steps[1],
            "finetune_student": cfg.steps[2],
        },
        "job_models": f"{JOB_BODY['teacher']} -> {JOB_BODY['student']}, {JOB_BODY['image_size']} px",
        "jobs_finished": by_status.get("succeeded", 0),
        "jobs_failed": len(failed),
        "jobs_failed_errors": failed,
        "jobs_by_status_at_end": by_status,
        "jobs_finished_at_s": watched.get("finished_at", {}),
        "jobs_running_min": min(running) if running else 0,
        "jobs_running_mean": round(statistics.mean(running), 2) if running else 0.0,
        "watch_errors": watched.get("errors", [])[:20],
        "celery_workers": cfg.workers,
        "worker_nice": cfg.worker_nice,
        "worker_autogroup_nice": cfg.worker_autogroup_nice,
        "autogroups": Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        if Path("/proc/sys/kernel/sched_autogroup_enabled").exists()
        else False,
        "api_workers": cfg.api_workers,
        "api_alive_after": api_alive,
        "workers_alive_after": workers_alive,
        "rate_limit": "KT_RATE_LIMIT_PER_MIN unset: 600 a minute per key, bursts of 100",
        "cpu_cores": cpu,
        "machine_busy_cores": round(machine_busy, 2),
        "loadavg_before": [round(x, 2) for x in loadavg_before],
        "loadavg_after": [round(x, 2) for x in loadavg_after],
    }

"""Service benchmark (BENCHMARKS.md §4): the API alone, in production shape, on this machine.

A fresh PostgreSQL database (``kt_bench_<rand>`` on 127.0.0.1:5432, dropped at the end), Redis
db 10 as the Celery broker (flushed at start and end), ONE uvicorn API process
(``--factory service.app:create_app``) and NO Celery worker: jobs stay queued, so what is
measured is the API.

1. submit latency: POST /v1/jobs, each answered 202 + ``queued``; median and max of N submits;
2. status polling: an open-loop load generator (``loadgen.py``: raw keep-alive HTTP/1.1 on
   asyncio/uvloop, a few tens of microseconds of CPU per request) at a fixed rate of
   GET /v1/jobs/{id}; each request is scheduled at an exact time and its latency counted from
   that time (a slow server delays the following requests' start, which is counted, so
   coordinated omission is not hidden); CPU of the API, of PostgreSQL, of the generator and of
   whatever else ran on the machine meanwhile is recorded;
3. upload: a ~200 MB zip of incompressible (random-noise PNG) images, streamed as a multipart
   generator body, while a thread polls the API process tree's VmRSS every 50 ms.

4. with ``--mixed``: the mixed load of ``mixed.py`` (its own API process, the default rate limit,
   two Celery workers): 200 status pollers + 5 uploaders + 2 running jobs, reported under ``mixed``.

The standard phases run with ``KT_RATE_LIMIT_PER_MIN`` set far above their one key's 200 req/s,
so the limiter is on the request path (its cost measured) without limiting.

python bench/service/run.py --mixed               # the full run; writes bench/results/service.{json,md}
python bench/service/run.py --workers 2           # two uvicorn processes (production runs one)
python bench/service/run.py --upload-mb 5 --duration 3 --out /tmp/smoke   # a smoke test
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import io
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import open_loop
from mixed import MixedConfig, run_mixed, session_nice

REPO = Path(__file__).resolve().parents[2]
BARS = {"status_p99_ms": 50.0, "status_rps": 200.0, "upload_rss_growth_mb": 100.0, "submit_ms": 100.0}
MB = 1024 * 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn --workers (default 1, as the Dockerfile and compose run it)",
    )
    p.add_argument("--rate", type=float, default=200.0, help="status polling requests per second")
    p.add_argument("--duration", type=float, default=20.0, help="status polling seconds (measured)")
    p.add_argument("--warmup", type=float, default=2.0, help="status polling seconds before measuring")
    p.add_argument("--pool", type=int, default=50, help="client connection pool size")
    p.add_argument("--submits", type=int, default=20, help="measured job submits")
    p.add_argument("--upload-mb", type=float, default=200.0, help="size of the uploaded zip, MB")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    p.add_argument("--name", default="service", help="results file stem")
    p.add_argument("--note", default="", help="a free-text paragraph appended to the .md")
    p.add_argument("--mixed", action="store_true", help="also run the mixed load (mixed.py)")
    p.add_argument("--mixed-duration", type=float, default=60.0, help="mixed load seconds")
    p.add_argument("--mixed-pollers", type=int, default=200, help="mixed load: status pollers (one key each)")
    p.add_argument("--mixed-uploaders", type=int, default=5, help="mixed load: concurrent uploaders")
    p.add_argument("--mixed-upload-mb", type=float, default=4.0, help="mixed load: size of each upload, MB")
    p.add_argument("--mixed-workers", type=int, default=2, help="mixed load: Celery worker processes")
    p.add_argument("--mixed-worker-nice", type=int, default=0, help="mixed load: nice of the Celery workers")
    p.add_argument(
        "--mixed-worker-autogroup-nice",
        type=int,
        default=None,
        help="mixed load: niceness of the Celery workers' sessions (Linux autogroups; see mixed.py)",
    )
    p.add_argument("--mixed-api-workers", type=int, default=1, help="mixed load: uvicorn --workers")
    p.add_argument("--mixed-jobs", type=int, default=12, help="mixed load: training jobs queued at the start")
    p.add_argument(
        "--mixed-steps",
        default="30,400,30",
        help="mixed load: finetune_teacher,distill,finetune_student steps",
    )
    return p.parse_args()


# --- infrastructure


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_db(admin_url: str) -> Iterator[tuple[str, str]]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"kt_bench_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        version = str(conn.execute(text("SHOW server_version")).scalar())
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False), version
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def redis_db(url: str) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    client.flushdb()
    version = str(client.info("server").get("redis_version", "?"))
    try:
        yield version
    finally:
        client.flushdb()
        client.close()


@contextlib.contextmanager
def api_process(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        session_nice(proc.pid)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # what it started and left behind in its session (the API's ingest processes survive it)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise SystemExit(f"{url} not ready within {timeout:g} s:\n{log.read_text()[-4000:]}")


# --- process-tree RSS


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(x) for x in fh.read().split())
    return out


def tree_rss_bytes(pid: int) -> int:
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        stack.extend(_children(p))
    return total


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> set[int]:
    out, stack = set(), [pid]
    while stack:
        p = stack.pop()
        if p not in out:
            out.add(p)
            stack.extend(_children(p))
    return out


def process_table() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds) of every process on the machine."""
    out: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry}/stat") as fh:
                raw = fh.read()
                comm = raw[raw.index("(") + 1 : raw.rindex(")")]
                fields = raw.rsplit(")", 1)[1].split()
                out[int(entry)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_group(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    wall: float,
    ours: dict[str, set[int]],
) -> dict[str, float]:
    """Cores used during ``wall`` seconds, per group: ours (by pid), ``postgres`` (every backend of
    the server, including other users'), and everything else by command name."""
    groups: dict[str, float] = collections.defaultdict(float)
    for pid, (comm, cpu) in after.items():
        used = cpu - before.get(pid, (comm, 0.0))[1] if pid in before else cpu  # new processes: all of it
        if used <= 0:
            continue
        name = next((g for g, pids in ours.items() if pid in pids), None)
        if name is None:
            name = "postgres" if comm == "postgres" else f"other: {comm}"
        groups[name] += used / wall
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def machine_cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, tree_rss_bytes(self.pid))


# --- datasets


def png_bytes(rng: np.random.Generator, side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def write_zip(path: Path, target_bytes: int, side: int, seed: int = 0, min_images: int = 4) -> int:
    """An ImageFolder zip (2 classes, stored) of random-noise PNGs, about ``target_bytes``; returns images."""
    rng = np.random.default_rng(seed)
    n = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        while n < min_images or path.stat().st_size < target_bytes:
            zf.writestr(f"data/{'ab'[n % 2]}/img_{n:05d}.png", png_bytes(rng, side))
            n += 1
            if n % 16 == 0:
                zf.fp.flush()  # type: ignore[union-attr]
    return n


def multipart_stream(path: Path, boundary: str, chunk: int = MB) -> tuple[Iterator[bytes], int]:
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)

    def gen() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as fh:
            while data := fh.read(chunk):
                yield data
        yield tail

    return gen(), length


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    boundary = secrets.token_hex(16)
    body, length = multipart_stream(path, boundary)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
    return client.post("/v1/datasets", content=body, headers=headers, timeout=600)


# --- measurements


def submit_once(client: httpx.Client, dataset_id: str) -> tuple[float, str]:
    body = {"dataset_id": dataset_id, "student": "timm:resnet18", "steps": {"distill": 10}}
    t = time.perf_counter()
    resp = client.post("/v1/jobs", json=body)
    ms = (time.perf_counter() - t) * 1000
    if resp.status_code != 202 or resp.json().get("status") != "queued":
        raise SystemExit(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:2000]}")
    return ms, str(resp.json()["id"])


# --- report


def versions(pg: str, redis_v: str) -> dict[str, str]:
    out = {"python": platform.python_version(), "postgresql": pg, "redis": redis_v}
    for pkg in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "sqlalchemy", "psycopg", "celery"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        mem = f", {int(fh.readline().split()[1]) / MB:.0f} GiB RAM"
    return f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}"


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    return [
        (
            "status polling p99 at 200 req/s",
            f"< {BARS['status_p99_ms']:g} ms, ≥ 99% of {BARS['status_rps']:g} req/s achieved, 0 errors",
            f"p99 {r['status_p99_ms']:.1f} ms at {r['rps']:.1f} req/s, {r['errors']} errors",
            r["status_p99_ms"] < BARS["status_p99_ms"]
            and r["rps"] >= 0.99 * BARS["status_rps"]
            and r["errors"] == 0,
        ),
        (
            f"{r['upload_mb']:.0f} MB upload: API RSS growth",
            f"< {BARS['upload_rss_growth_mb']:g} MB",
            f"{r['upload_rss_growth_mb']:.1f} MB ({r['upload_mb_s']:.1f} MB/s)",
            r["upload_rss_growth_mb"] < BARS["upload_rss_growth_mb"],
        ),
        (
            "submit → queued (p50)",
            f"< {BARS['submit_ms']:g} ms",
            f"p50 {r['submit_p50_ms']:.1f} ms, max {r['submit_max_ms']:.1f} ms",
            r["submit_p50_ms"] < BARS["submit_ms"],
        ),
    ] + (mixed_verdicts(r["mixed"]) if "mixed" in r else [])


def mixed_verdicts(m: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    return [
        (
            f"mixed load: {m['pollers']} pollers + {m['uploaders']} uploaders + {m['celery_workers']} running jobs, "
            f"{m['duration_s']:g} s",
            "0 errors, jobs finish, API and workers alive",
            f"{m['errors']} errors, {m['jobs_finished']} jobs finished, {m['jobs_failed']} failed, "
            f"workers alive {m['workers_alive_after']} of {m['celery_workers']}",
            m["errors"] == 0
            and m["jobs_finished"] > 0
            and m["api_alive_after"]
            and m["workers_alive_after"] == m["celery_workers"],
        ),
        (
            "mixed load: status polling p99 (§4's bar is for the API alone)",
            f"< {BARS['status_p99_ms']:g} ms",
            f"p99 {m['status_p99_ms']:.1f} ms, p50 {m['status_p50_ms']:.1f} ms; machine "
            f"{m['machine_busy_cores']:.2f} of {os.cpu_count()} cores busy",
            m["status_p99_ms"] < BARS["status_p99_ms"],
        ),
    ]


def mixed_markdown(m: dict[str, Any]) -> list[str]:
    s = m["status"]
    return [
        "",
        f"## Mixed load ({m['duration_s']:g} s, `bench/service/mixed.py`)",
        "",
        f"Its own uvicorn API ({m['api_workers']} process(es); rate limit {m['rate_limit']}), {m['celery_workers']} "
        f"Celery worker processes (solo pool, 1 torch thread each, nice {m['worker_nice']}; each in a session of "
        "its own, as under `kt serve`"
        + (
            f", its session's niceness {m['worker_autogroup_nice']}"
            if m.get("worker_autogroup_nice") is not None
            else ""
        )
        + (
            "; the kernel shares the CPU between sessions (autogroups) before niceness counts"
            if m.get("autogroups")
            else ""
        )
        + "), the same PostgreSQL and Redis; all on this machine. "
        f"{m['pollers']} pollers, each with its own API key and keep-alive connection, poll job status "
        f"({s['sent']} GETs in all, open loop); {m['uploaders']} uploaders each upload a {m['upload_mb']:.1f} MB zip "
        f"again and again (and delete it); {m['jobs']} training jobs ({m['job_models']}, steps "
        f"{m['job_steps']['finetune_teacher']}/{m['job_steps']['distill']}/{m['job_steps']['finetune_student']}) "
        "are queued at the start and run two at a time.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| errors (polls, uploads, deletes, job watch, failed jobs) | {m['errors']} |",
        f"| status polling: achieved req/s | {m['status_rps']:.1f} |",
        f"| status polling: p50 / p90 / p99 / max, ms | {m['status_p50_ms']:.1f} / {s['p90_ms']:.1f} / "
        f"{m['status_p99_ms']:.1f} / {s['max_ms']:.1f} |",
        f"| status polling: errors | {s['errors']} of {s['sent']} |",
        f"| uploads done ({m['uploaders']} at a time, {m['upload_mb']:.1f} MB each) | {m['uploads_done']} |",
        f"| upload MB/s, all uploaders together | {m['upload_mb_s']:.1f} |",
        f"| uploads refused for want of a turn (503, sent again after `Retry-After`) | {m.get('uploads_refused_busy', 0)} |",
        f"| upload time p50 / p99, s | {m['upload_s_p50']} / {m['upload_s_p99']} |",
        f"| jobs finished (succeeded) / failed in the window | {m['jobs_finished']} / {m['jobs_failed']} |",
        f"| jobs running when sampled (every second): min / mean | {m['jobs_running_min']} / "
        f"{m['jobs_running_mean']:.2f} |",
        f"| jobs at the end | {', '.join(f'{k} {v}' for k, v in sorted(m['jobs_by_status_at_end'].items()))} |",
        f"| API / workers alive after | {m['api_alive_after']} / {m['workers_alive_after']} of {m['celery_workers']} |",
        "",
        f"CPU during the window, cores (of {os.cpu_count()}; the machine was {m['machine_busy_cores']:.2f} busy): "
        + ", ".join(f"{k.removeprefix('other: ')} {v:.2f}" for k, v in m["cpu_cores"].items())
        + ".",
        "",
        f"Load average before / after the window: {' / '.join(f'{x:.2f}' for x in m['loadavg_before'])} → "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg_after'])} (1 / 5 / 15 min).",
    ]


def markdown(r: dict[str, Any]) -> str:
    d = r["details"]
    s = d["status"]
    lines = [
        "# Service benchmark (BENCHMARKS.md §4)",
        "",
        f"- date: {r['date']}; commit `{r['git_commit']}`; duration {r['duration_s']:.0f} s",
        f"- machine: {r['machine']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- command: `{r['command']}`"
        + "".join(f", `{k}={v}`" for k, v in r.get("settings_from_env", {}).items())
        + (f"; at nice {r['nice']}, its API's and workers' sessions too" if r.get("nice") else ""),
        f"- shape: PostgreSQL (fresh database), Redis broker, {d['uvicorn_workers']} uvicorn worker process(es), "
        "no Celery worker (jobs stay queued); client and server on the same machine.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| status polling: target rate, req/s | {d['rate']:g} for {d['duration_s']:g} s |",
        f"| status polling: achieved req/s | {r['rps']:.1f} |",
        f"| status polling: p50 / p90 / p99 / max, ms | {r['status_p50_ms']:.1f} / {s['p90_ms']:.1f} / "
        f"{r['status_p99_ms']:.1f} / {s['max_ms']:.1f} |",
        f"| status polling: errors | {r['errors']} of {s['sent']} |",
        f"| status polling: CPU of the API / PostgreSQL (all backends) / the load generator, cores | "
        f"{s['server_cpu_frac']:.2f} / {s['postgres_cpu_frac']:.2f} / {s['client_cpu_frac']:.2f} |",
        f"| status polling: CPU per request, API / load generator, ms | {s['server_cpu_ms_per_request']:.2f} / "
        f"{s['client_cpu_ms_per_request']:.3f} |",
        f"| status polling: whole machine busy, cores (of {os.cpu_count()}) | {s['machine_busy_cores']:.2f} |",
        f"| upload: size, MB ({d['upload_images']} PNG images) | {r['upload_mb']:.1f} |",
        f"| upload: API RSS before / peak, MB | {d['rss_before_mb']:.1f} / {d['rss_peak_mb']:.1f} |",
        f"| upload: API RSS growth, MB | {r['upload_rss_growth_mb']:.1f} |",
        f"| upload: MB/s (send + validate + store, until 201) | {r['upload_mb_s']:.1f} |",
        f"| submit → 202 queued: p50 / max of {d['submits']}, ms | {r['submit_p50_ms']:.1f} / "
        f"{r['submit_max_ms']:.1f} |",
        "",
        "| bar | target | measured | result |",
        "|---|---|---|---|",
    ]
    for name, target, measured, ok in verdicts(r):
        lines.append(f"| {name} | {target} | {measured} | {'PASS' if ok else 'FAIL'} |")
    others = ", ".join(f"{k[7:]} {v:.2f}" for k, v in s["other_cpu"].items()) or "nothing above 0.01 cores"
    lines += [
        "",
        "Status latency is counted from each request's scheduled time (open loop, "
        f"pool of at most {d['pool']} keep-alive connections, {s['event_loop']}; `bench/service/loadgen.py`), "
        "so a stall delays and counts every request behind it. "
        "RSS is VmRSS of the uvicorn process and its children, polled every 50 ms.",
        "",
        f"Else running during the status phase (processes alive at its end; cores): {others}; load average before it "
        f"{' / '.join(f'{x:.2f}' for x in s['loadavg_before'])} (1 / 5 / 15 min).",
    ]
    if "mixed" in r:
        lines += mixed_markdown(r["mixed"])
    if r.get("note"):
        lines += ["", r["note"]]
    lines.append("")
    return "\n".join(lines)


# --- main


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # the note goes in the report, not in the command line
        if arg == "--note":
            argv = argv[:i] + argv[i + 2 :]
            break
        if arg.startswith("--note="):
            argv = argv[:i] + argv[i + 1 :]
            break
    command = "python " + shlex.join([os.path.relpath(__file__, REPO), *argv])
    sys.path.insert(0, str(REPO))
    from service.admin import create_tenant_key
    from service.db.session import init_db, make_engine, make_session_factory

    with (
        tempfile.TemporaryDirectory(prefix="kt-bench-") as tmp_name,
        postgres_db(args.pg_admin_url) as (db_url, pg_version),
        redis_db(args.redis_url) as redis_version,
    ):
        tmp = Path(tmp_name)
        data_dir = tmp / "data"
        data_dir.mkdir()
        upload_bytes = int(args.upload_mb * MB)

        print(f"generating a {args.upload_mb:g} MB zip ...", flush=True)
        big_zip, small_zip = tmp / "big.zip", tmp / "small.zip"
        n_big = write_zip(big_zip, upload_bytes, 512, seed=1)
        write_zip(small_zip, 0, 32, seed=2, min_images=8)

        init_db(db_url)
        engine = make_engine(db_url)
        try:
            with make_session_factory(engine)() as session:
                key = create_tenant_key(session, "bench")
        finally:
            engine.dispose()

        # the service's own settings come from here, except the CPU-sharing knobs, which an A/B run
        # sets from outside (KT_INGEST_PROCESSES=0 KT_WORKER_NICE=0: the API validates uploads
        # itself and the workers run at its priority; KT_UPLOAD_PACE_MS=0 KT_CONCURRENT_UPLOADS=5:
        # uploads are neither paced nor kept waiting)
        passed = (
            "KT_INGEST_PROCESSES", "KT_INGEST_NICE", "KT_WORKER_NICE", "KT_WEBHOOK_POLL_INTERVAL_S",
            "KT_CONCURRENT_UPLOADS", "KT_UPLOAD_QUEUE", "KT_UPLOAD_QUEUE_TIMEOUT_S", "KT_UPLOAD_PACE_MS",
            "KT_UPLOAD_BUSY_MB_S", "KT_GIL_SWITCH_INTERVAL_MS",
            "KT_DB_POOL_SIZE", "KT_DB_MAX_OVERFLOW",
        )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("KT_") or k in passed}
        env.update(
            PYTHONUNBUFFERED="1",
            KT_DATABASE_URL=db_url,
            KT_BROKER_URL=args.redis_url,
            KT_RESULT_BACKEND=args.redis_url,
            KT_DATA_DIR=str(data_dir),
            KT_MAX_UPLOAD_BYTES=str(max(2 * 1024**3, 2 * big_zip.stat().st_size)),
        )
        mixed_env = dict(env)  # the mixed phase: the default rate limit
        env["KT_RATE_LIMIT_PER_MIN"] = str(1_000_000)  # one key at 200 req/s: on the path, never limiting
        # its submits all stay queued (no worker in the standard phases): the per-tenant quota
        # (KT_MAX_QUEUED_JOBS_PER_TENANT, 20) on the path, never refusing
        env["KT_MAX_QUEUED_JOBS_PER_TENANT"] = str(1_000_000)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [
            str(Path(sys.executable).parent / "uvicorn"), "--factory", "service.app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers),
        ]  # fmt: skip
        log = tmp / "api.log"
        with api_process(cmd, env, log) as api:
            wait_ready(f"{base}/readyz", api, log)
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
                resp = upload(client, small_zip)
                if resp.status_code != 201:
                    raise SystemExit(f"small upload answered {resp.status_code}: {resp.text[:2000]}")
                dataset_id = resp.json()["id"]

                print("submitting jobs ...", flush=True)
                _, job_id = submit_once(client, dataset_id)  # the job to poll (and a warm-up)
                for _ in range(3):
                    submit_once(client, dataset_id)
                submits = [submit_once(client, dataset_id)[0] for _ in range(args.submits)]

            print(f"status polling at {args.rate:g} req/s ...", flush=True)
            url = f"{base}/v1/jobs/{job_id}"
            if args.warmup > 0:
                open_loop(url, headers, args.rate, args.warmup, args.pool)
            ours = {"api": tree_pids(api.pid), "load generator": {os.getpid()}}
            loadavg_before = os.getloadavg()
            table0, busy0, client0 = process_table(), machine_cpu_busy(), time.process_time()
            wall0 = time.monotonic()
            status = open_loop(url, headers, args.rate, args.duration, args.pool)
            wall = time.monotonic() - wall0
            client_cpu, busy1, table1 = time.process_time() - client0, machine_cpu_busy(), process_table()
            groups = cpu_by_group(table0, table1, wall, ours)
            status["server_cpu_frac"] = groups.get("api", 0.0)
            status["client_cpu_frac"] = client_cpu / wall
            status["postgres_cpu_frac"] = groups.get("postgres", 0.0)
            status["server_cpu_ms_per_request"] = (
                status["server_cpu_frac"] * wall / max(status["ok"], 1) * 1000
            )
            status["client_cpu_ms_per_request"] = client_cpu / max(status["sent"], 1) * 1000
            status["machine_busy_cores"] = (
                (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * (os.cpu_count() or 1)
            )
            status["other_cpu"] = {
                k: round(v, 3) for k, v in groups.items() if k.startswith("other: ") and v >= 0.01
            }
            status["loadavg_before"] = [round(x, 2) for x in loadavg_before]

            print(f"uploading {big_zip.stat().st_size / MB:.1f} MB ...", flush=True)
            time.sleep(0.5)
            rss_before = tree_rss_bytes(api.pid)
            sampler = RssSampler(api.pid)
            sampler.start()
            with httpx.Client(base_url=base, headers=headers) as client:
                t = time.perf_counter()
                resp = upload(client, big_zip)
                upload_s = time.perf_counter() - t
            sampler.stop()
            if resp.status_code != 201:
                raise SystemExit(f"large upload answered {resp.status_code}: {resp.text[:2000]}")
            if resp.json().get("num_images") != n_big:
                raise SystemExit(f"large upload: {resp.json().get('num_images')} images, expected {n_big}")
            rss_after = tree_rss_bytes(api.pid)
            if api.poll() is not None:
                raise SystemExit(f"the API exited {api.returncode}:\n{log.read_text()[-4000:]}")

        mixed: dict[str, Any] | None = None
        if args.mixed:
            cfg = MixedConfig(
                duration=args.mixed_duration,
                pollers=args.mixed_pollers,
                uploaders=args.mixed_uploaders,
                upload_mb=args.mixed_upload_mb,
                jobs=args.mixed_jobs,
                workers=args.mixed_workers,
                worker_nice=args.mixed_worker_nice,
                worker_autogroup_nice=args.mixed_worker_autogroup_nice,
                api_workers=args.mixed_api_workers,
                steps=tuple(int(x) for x in args.mixed_steps.split(",")),  # type: ignore[arg-type]
            )
            # the standard phase's jobs (no worker ran them) must not reach the mixed phase's workers:
            # their tasks leave the broker, their rows are canceled
            import redis
            from sqlalchemy import update

            from service.db.models import Job

            redis.Redis.from_url(args.redis_url).flushdb()
            engine = make_engine(db_url)
            try:
                with make_session_factory(engine)() as session:
                    session.execute(update(Job).where(Job.status == "queued").values(status="canceled"))
                    session.commit()
            finally:
                engine.dispose()
            print(f"mixed load: generating data, {1 + cfg.pollers + cfg.uploaders} keys ...", flush=True)
            train_zip, mixed_zip = tmp / "train.zip", tmp / "mixed.zip"
            write_zip(train_zip, 0, 32, seed=3, min_images=32)
            write_zip(mixed_zip, int(cfg.upload_mb * MB), 256, seed=4)
            engine = make_engine(db_url)
            try:
                with make_session_factory(engine)() as session:
                    keys = [
                        create_tenant_key(session, "bench") for _ in range(1 + cfg.pollers + cfg.uploaders)
                    ]
            finally:
                engine.dispose()
            mixed = run_mixed(
                cfg, tmp=tmp, env=mixed_env, port=free_port(), keys=keys, train_zip=train_zip,
                upload_zip=mixed_zip, wait_ready=wait_ready,
            )  # fmt: skip

        upload_mb = big_zip.stat().st_size / MB
        result: dict[str, Any] = {
            "status_p50_ms": round(status["p50_ms"], 2),
            "status_p99_ms": round(status["p99_ms"], 2),
            "rps": round(status["rps"], 1),
            "errors": status["errors"],
            "upload_mb": round(upload_mb, 1),
            "upload_rss_growth_mb": round((sampler.peak - rss_before) / MB, 1),
            "upload_mb_s": round(upload_mb / upload_s, 1),
            "submit_ms": round(statistics.median(submits), 2),
            "submit_p50_ms": round(statistics.median(submits), 2),
            "submit_max_ms": round(max(submits), 2),
            "command": command,
            "machine": machine(),
            "versions": versions(pg_version, redis_version),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": git_commit(),
            "note": args.note,
            "settings_from_env": {k: v for k, v in env.items() if k in passed},
            "nice": os.nice(0),  # the benchmark's, and its API's and workers' sessions' (session_nice)
            "duration_s": 0.0,
            "details": {
                "uvicorn_workers": args.workers,
                "rate": args.rate,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "pool": args.pool,
                "status": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in status.items()},
                "submits": args.submits,
                "submit_all_ms": [round(x, 2) for x in submits],
                "upload_images": n_big,
                "upload_s": round(upload_s, 2),
                "rss_before_mb": round(rss_before / MB, 1),
                "rss_peak_mb": round(sampler.peak / MB, 1),
                "rss_after_mb": round(rss_after / MB, 1),
                "rss_samples": sampler.samples,
            },
        }
    if mixed is not None:
        result["mixed"] = mixed
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["bars"] = [
        {"bar": name, "target": target, "measured": measured, "pass": ok}
        for name, target, measured, ok in verdicts(result)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    md = markdown(result)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""CPU cost of one ``GET /v1/jobs/{id}`` in the API process, without any HTTP client or socket.

The app (``service.app:create_app``, PostgreSQL in a fresh database) is driven as a bare ASGI
callable from one event loop, one request at a time, exactly as uvicorn calls it (sync
dependencies and the handler go through the threadpool). Reported: CPU ms per request (process
time of all threads / requests, so it includes the threadpool hops) and wall ms per request;
``--profile`` adds a cProfile listing of the hottest functions.

python bench/service/profile_status.py                    # 2000 requests
python bench/service/profile_status.py --profile --n 500  # + cProfile, top 30 by cumulative time
python bench/service/profile_status.py --pace-ms 4        # ~200 req/s, idle in between, as in the benchmark
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import postgres_db  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--n", type=int, default=2000, help="measured requests")
    p.add_argument("--profile", action="store_true", help="print a cProfile listing")
    p.add_argument(
        "--pace-ms",
        type=float,
        default=0.0,
        help="idle time between requests (as at a fixed rate: caches go cold)",
    )
    p.add_argument("--top", type=int, default=30)
    return p.parse_args()


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    status, body = 0, b""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app(scope, receive, send)
    return status, body


async def drive(
    app: Any, path: str, key: str, n: int, profile: cProfile.Profile | None, pace_s: float = 0.0
) -> tuple[float, float]:
    headers = [(b"host", b"bench"), (b"authorization", f"Bearer {key}".encode())]
    for _ in range(50):  # warm up: pool connections, caches, lazy imports
        status, body = await call(app, path, headers)
        assert status == 200, (status, body)
    if profile is not None:
        profile.enable()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        status, body = await call(app, path, headers)
        assert status == 200, (status, body)
        if pace_s > 0:
            await asyncio.sleep(pace_s)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if profile is not None:
        profile.disable()
    return cpu / n * 1000, wall / n * 1000


def main() -> None:
    args = parse_args()
    from sqlalchemy import select

    from service.admin import create_tenant_key
    from service.app import create_app
    from service.db.models import Job, Tenant, new_id
    from service.db.session import init_db, make_engine, make_session_factory
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="kt-prof-") as tmp, postgres_db(args.pg_admin_url) as (url, _):
        init_db(url)
        engine = make_engine(url)
        with make_session_factory(engine)() as session:
            key = create_tenant_key(session, "prof")
            tenant = session.scalars(select(Tenant).where(Tenant.name == "prof")).one()
            job = Job(
                id=new_id(), tenant_id=tenant.id, kind="pipeline", status="running", stage="distill",
                progress=0.42, eta_s=120.0, params={"request": {"dataset_id": "x", "student": "timm:resnet18"}},
                stage_timings={"finetune_teacher": 12.5, "curate": 30.1}, metrics={"teacher_acc": 91.0},
            )  # fmt: skip
            session.add(job)
            session.commit()
            job_id = job.id
        engine.dispose()

        settings = Settings(data_dir=Path(tmp) / "data", database_url=url)  # type: ignore[call-arg]
        app = create_app(settings, migrate=False)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        profile = cProfile.Profile() if args.profile else None
        try:
            cpu_ms, wall_ms = asyncio.run(
                drive(app, f"/v1/jobs/{job_id}", key, args.n, profile, args.pace_ms / 1000)
            )
        finally:
            app.state.engine.dispose()
        print(
            f"GET /v1/jobs/{{id}}: {cpu_ms:.3f} CPU ms / request, {wall_ms:.3f} wall ms / request (n={args.n})"
        )
        if profile is not None:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()

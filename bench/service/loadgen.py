"""A cheap open-loop HTTP/1.1 GET load generator (for the service benchmark's status polling).

Requests are scheduled at fixed times (``rate`` per second) with ``loop.call_at``, whatever the
server does; each is sent on an idle keep-alive connection of a bounded pool, or, when all are
busy, waits for the next free one. Latency runs from the request's *scheduled* time to the last
byte of its response, so time spent waiting for a connection, a slow server and the generator's
own lag are all counted (no coordinated omission).

The client is hand-written on ``asyncio.Protocol`` (uvloop when installed): a fixed request in
bytes, and a response parser that reads the status line and ``Content-Length`` (the API always
sends it; a chunked or unframed response counts as an error). It costs a few tens of
microseconds of CPU per request, where an httpx client costs milliseconds: on a small machine
shared with the server, the generator must not be what limits the rate.

python bench/service/loadgen.py http://127.0.0.1:8000/v1/jobs/ID --key kt_... --rate 200 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import numpy as np

IDLE_REUSE_S = 4.0  # uvicorn closes a connection idle for 5 s (--timeout-keep-alive); reuse below that


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q, method="higher"))


def new_event_loop() -> tuple[asyncio.AbstractEventLoop, str]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), "asyncio"
    return uvloop.new_event_loop(), f"uvloop {uvloop.__version__}"


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, on_done: Callable[[_Conn, float, int | None, str], None]) -> None:
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.at: float | None = None  # the scheduled time of the request in flight
        self.idle_since = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, at: float) -> None:
        assert self.transport is not None and self.at is None
        self.at = at
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.at is None:
            self._fail("data without a request")
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.1 ") or i < 0:
            self._fail("response without Content-Length")
            return
        j = head.find(b"\r\n", i + 2)
        total = end + 4 + int(head[i + 17 : j if j >= 0 else len(head)])
        if len(self.buf) < total:
            return
        if len(self.buf) > total:
            self._fail("more bytes than the response")
            return
        self.buf.clear()
        at, self.at = self.at, None
        status = int(head[9:12])
        if b"\r\nconnection: close" in head:
            self.close()
        self.on_done(self, at, status, "")

    def _fail(self, why: str) -> None:
        at, self.at = self.at, None
        self.close()
        if at is not None:
            self.on_done(self, at, None, why)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.at is not None:
            at, self.at = self.at, None
            self.on_done(self, at, None, f"connection lost ({type(exc).__name__ if exc else 'closed'})")
        else:
            self.on_done(self, -1.0, None, "")  # an idle connection went away: just forget it


def _request_bytes(url: str, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"an http:// URL is needed, got {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    return parts.hostname, parts.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class OpenLoop:
    """``variants``: other (url, headers) pairs on the same host, sent in turn (request i is
    ``variants[i % len(variants)]``), e.g. one API key per simulated client. ``fifo``: send each
    request on the connection idle the longest (every connection of the pool stays in use, as
    with many clients polling), instead of the most recently used one (as few as the rate needs)."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        pool: int,
        variants: list[tuple[str, dict[str, str]]] | None = None,
        fifo: bool = False,
    ) -> None:
        self.host, self.port, request = _request_bytes(url, headers)
        self.requests = [request]
        if variants:
            built = [_request_bytes(u, h) for u, h in variants]
            if any((host, port) != (self.host, self.port) for host, port, _ in built):
                raise ValueError("every variant must be on the same host and port as the url")
            self.requests = [req for _, _, req in built]
        self.fired = 0
        self.fifo = fifo
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.conns: set[_Conn] = set()
        self.idle: collections.deque[_Conn] = collections.deque()  # most recently used at the right
        self.backlog: collections.deque[float] = collections.deque()
        self.connecting = 0
        self.latencies: list[float] = []
        self.scheduled: list[float] = []  # the scheduled time of each latency, same order
        self.t0 = 0.0
        self.errors: list[str] = []
        self.done = 0
        self.expected = 0
        self.finished = self.loop.create_future()

    async def connect(self) -> None:
        self.connecting += 1
        try:
            _, conn = await self.loop.create_connection(lambda: _Conn(self._on_done), self.host, self.port)
        except OSError as err:
            self.connecting -= 1
            self._record(self.backlog.popleft() if self.backlog else -1.0, None, f"connect: {err}")
            return
        self.connecting -= 1
        self.conns.add(conn)
        self._release(conn)

    def _record(self, at: float, status: int | None, why: str) -> None:
        if at < 0:
            return
        self.done += 1
        if status == 200:
            self.latencies.append((time.perf_counter() - at) * 1000)
            self.scheduled.append(at)
        else:
            self.errors.append(f"HTTP {status}" if status is not None else why)
        if self.done >= self.expected and not self.finished.done():
            self.finished.set_result(None)

    def _on_done(self, conn: _Conn, at: float, status: int | None, why: str) -> None:
        if conn.closed:
            self.conns.discard(conn)
            if conn in self.idle:
                self.idle.remove(conn)
        self._record(at, status, why)
        if not conn.closed:
            self._release(conn)
        elif self.backlog and len(self.conns) + self.connecting < self.pool:
            self.loop.create_task(self.connect())

    def _next_request(self) -> bytes:
        request = self.requests[self.fired % len(self.requests)]
        self.fired += 1
        return request

    def _release(self, conn: _Conn) -> None:
        if self.backlog:
            conn.send(self._next_request(), self.backlog.popleft())
        else:
            conn.idle_since = time.perf_counter()
            self.idle.append(conn)

    def fire(self, at: float) -> None:
        now = time.perf_counter()
        while self.idle:
            conn = self.idle.popleft() if self.fifo else self.idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_REUSE_S:
                conn.send(self._next_request(), at)
                return
            conn.close()
            self.conns.discard(conn)
        self.backlog.append(at)
        if len(self.conns) + self.connecting < self.pool:
            self.loop.create_task(self.connect())

    async def run(self, rate: float, duration: float, warm_conns: int, drain_s: float) -> dict[str, Any]:
        await asyncio.gather(*(self.connect() for _ in range(min(warm_conns, self.pool))))
        n = round(rate * duration)
        self.expected = n
        # Timers run on the loop's clock (uvloop's has 1 ms steps); latencies on perf_counter, from
        # the exact scheduled instant, so a late timer is counted as latency, not hidden.
        loop_t0, t0 = self.loop.time() + 0.05, time.perf_counter() + 0.05
        self.t0 = t0
        for i in range(n):
            self.loop.call_at(loop_t0 + i / rate, self.fire, t0 + i / rate)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.finished), timeout=duration + drain_s + 0.1)
        elapsed = time.perf_counter() - t0
        timed_out = n - self.done
        for conn in list(self.conns):
            conn.at = None
            conn.close()
        await asyncio.sleep(0.05)  # let the transports close
        lat = self.latencies
        slowest = sorted(range(len(lat)), key=lat.__getitem__)[-10:][::-1]
        return {
            "sent": n,
            "ok": len(lat),
            "errors": len(self.errors) + timed_out,
            "error_kinds": sorted(
                set(self.errors) | ({f"no response within {drain_s:g} s"} if timed_out else set())
            ),
            "rps": len(lat) / elapsed,
            "p50_ms": pct(lat, 50),
            "p90_ms": pct(lat, 90),
            "p99_ms": pct(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
            "elapsed_s": elapsed,
            "connections_max": self.pool,
            # the 10 slowest: [seconds into the run it was scheduled at, latency ms]
            "slowest": [[round(self.scheduled[i] - t0, 3), round(lat[i], 1)] for i in slowest],
        }


def open_loop(
    url: str,
    headers: dict[str, str],
    rate: float,
    duration: float,
    pool: int = 50,
    drain_s: float = 10.0,
    variants: list[tuple[str, dict[str, str]]] | None = None,
    fifo: bool = False,
    warm_conns: int = 8,
) -> dict[str, Any]:
    """GET ``url`` at ``rate``/s for ``duration`` s, open loop (see the module docstring); returns
    sent / ok / errors / rps (responses per second of the run) / p50 / p90 / p99 / max (ms) and
    the event loop used. Requests unanswered ``drain_s`` after the last one was due are errors.
    ``variants``, ``fifo``: see ``OpenLoop``; ``warm_conns`` connections are opened before the start."""
    loop, name = new_event_loop()
    try:

        async def main() -> dict[str, Any]:
            gen = OpenLoop(url, headers, pool, variants=variants, fifo=fifo)
            return await gen.run(rate, duration, min(pool, warm_conns), drain_s)

        result = loop.run_until_complete(main())
    finally:
        loop.close()
    result["event_loop"] = name
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--key", help="API key, sent as `Authorization: Bearer <key>`")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--pool", type=int, default=50)
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    cpu0, wall0 = time.process_time(), time.monotonic()
    result = open_loop(args.url, headers, args.rate, args.duration, args.pool)
    result["client_cpu_frac"] = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

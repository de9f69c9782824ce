"""Job-finished notifications: a job's ``webhook_url`` gets one signed JSON POST when the job ends
(succeeded, failed or canceled), with retries, and the outcome is recorded on the job.

Who sends: every API process runs a ``WebhookDispatcher`` (a thread, every
``KT_WEBHOOK_POLL_INTERVAL_S``) that looks for final jobs whose notification is due. Whatever made
the job final (the worker, a cancel, the reaper, a dead worker's hand-back) needs to know nothing
about webhooks, and a notification due while no API process ran is sent when one starts. A
dispatcher claims a delivery with a conditional UPDATE (``waiting``/``retrying`` -> ``sending``,
held for ``HOLD_S``), so with several API processes each notification is sent by one of them; one
that dies while sending leaves the hold to run out, and another sends it again.

The receiver checks ``X-KT-Signature: sha256=<hex>``, the HMAC-SHA256 of the raw body under the
job's ``webhook_secret`` (returned once, in the 202 answer of ``POST /v1/jobs``); the body's
``delivery_id`` and ``sent_at`` let it drop replays. A retried job (``POST /v1/jobs/{id}/retry``)
notifies again when it ends again.

Where it may go: ``https://`` only, plain ``http://`` to the hosts in ``KT_WEBHOOK_HTTP_HOSTS``;
never to a private, loopback, link-local or otherwise non-public address unless it lies in
``KT_WEBHOOK_ALLOWED_NETWORKS``; checked at submit (422) and again before every attempt, with the
host resolved anew (a name that later resolves inward is caught then); redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import JOB_FINAL_STATUSES, Job, Model, utcnow
from service.db.session import make_engine, make_session_factory
from service.redact import redactor_for
from service.settings import Settings

log = logging.getLogger("service.webhooks")

SIGNATURE_HEADER = "X-KT-Signature"
EVENT_HEADER = "X-KT-Event"
DELIVERY_HEADER = "X-KT-Delivery"
EVENT = "job.finished"
HOLD_S = 120.0  # a claim older than this was lost with its dispatcher: send again
MAX_URL_LENGTH = 2000
DUE_STATES = ("waiting", "retrying", "sending")
MAX_ERROR_CHARS = 300


class WebhookRefused(ValueError):
    """A webhook URL the service will not call; the message names the fix."""


def new_secret() -> str:
    return secrets.token_hex(32)


def sign(secret: str, body: bytes) -> str:
    """The ``X-KT-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256 under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """What a receiver does: compare in constant time."""
    return hmac.compare_digest(sign(secret, body), signature)


# --- where a webhook may go


def _allowed_networks(settings: Settings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(net, strict=False) for net in settings.webhook_allowed_networks]


def _address_problem(address: str, settings: Settings) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    if any(ip in net for net in _allowed_networks(settings)):
        return None
    return (
        f"resolves to {ip}, a private, loopback or reserved address the service does not call; use a "
        "public https:// URL (an operator can allow such networks with KT_WEBHOOK_ALLOWED_NETWORKS)"
    )


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (an IP literal: itself)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, settings: Settings, *, resolve_host: bool = True) -> str:
    """``url`` if the service may POST to it; ``WebhookRefused`` naming the fix otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise WebhookRefused(f"is not a URL ({err})") from err
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("https", "http") or not host:
        raise WebhookRefused("must be an absolute https:// URL, e.g. https://example.com/hooks/kt")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused(
            "must not carry a user or password; check the X-KT-Signature header to authenticate the service"
        )
    if parts.fragment:
        raise WebhookRefused("must not have a #fragment")
    if parts.scheme == "http" and host not in {h.lower() for h in settings.webhook_http_hosts}:
        raise WebhookRefused(
            f"uses plain http to {host!r}; use https:// (an operator can allow plain http to a host "
            "with KT_WEBHOOK_HTTP_HOSTS)"
        )
    if resolve_host:
        try:
            addresses = resolve(host, port or (443 if parts.scheme == "https" else 80))
        except OSError as err:
            raise WebhookRefused(f"names host {host!r}, which does not resolve ({err})") from err
        for address in addresses:
            problem = _address_problem(address, settings)
            if problem is not None:
                raise WebhookRefused(f"names host {host!r}, which {problem}")
    return url


# --- what is sent


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The job's metrics without the bulky parts (per-class tables, confusion matrices): its
    top-level numbers, and the numbers of each section one level down."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, int | float | str | bool) or value is None:
            out[key] = value
        elif isinstance(value, dict):
            flat = {k: v for k, v in value.items() if isinstance(v, int | float | bool)}
            if flat:
                out[key] = flat
        elif key == "warnings" and isinstance(value, list):
            out[key] = [str(v) for v in value][:20]
    return out


def payload(job: Job, model_id: str | None, delivery_id: str, sent_at: datetime) -> dict[str, Any]:
    return {
        "event": EVENT,
        "delivery_id": delivery_id,
        "sent_at": sent_at.isoformat(),
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "model_id": model_id,
        "metrics": _summary(job.metrics or {}),
        "error": job.error,
        "attempts": job.attempts,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def public_delivery(job: Job) -> dict[str, Any] | None:
    """The ``webhook`` field of the job's JSON (never the secret)."""
    if not job.webhook_url:
        return None
    record = dict(job.webhook_delivery or {})
    return {
        "url": job.webhook_url,
        "state": job.webhook_state,
        "attempts": record.get("attempts", []),
        "delivered_at": record.get("delivered_at"),
        "next_attempt_at": job.webhook_next_at.isoformat()
        if job.webhook_next_at is not None and job.webhook_state == "retrying"
        else None,
    }


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a hop: following one could lead to an address never checked."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects())


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST ``body``; the receiver's status code (any 2xx counts as delivered). Raises ``OSError``
    for a connection that fails."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout_s) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:  # a non-2xx answer (redirects included)
        return int(err.code)


# --- the dispatcher


def _due(now: datetime) -> Any:
    return (
        Job.webhook_state.in_(DUE_STATES),
        Job.status.in_(JOB_FINAL_STATUSES),
        or_(Job.webhook_next_at.is_(None), Job.webhook_next_at <= now),
    )


def claim_due(session_factory: sessionmaker[Session], limit: int = 20) -> list[str]:
    """Claim up to ``limit`` due notifications; the ids of the jobs claimed."""
    now = utcnow()
    claimed = []
    with session_factory() as session:
        rows = session.execute(select(Job.id, Job.webhook_state).where(*_due(now)).limit(limit)).all()
        for job_id, state in rows:
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.webhook_state == state, *_due(now))
                .values(webhook_state="sending", webhook_next_at=now + timedelta(seconds=HOLD_S)),
                execution_options={"synchronize_session": False},
            )
            session.commit()
            if done.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(job_id)
    return claimed


def deliver(
    session_factory: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    send: Callable[[str, bytes, dict[str, str], float], int] = post,
) -> str:
    """One attempt for a claimed job; records it and returns the new state."""
    with session_factory() as session:
        job = session.get(Job, job_id)
        if job is None or job.webhook_state != "sending" or not job.webhook_url:
            return "gone"
        model_id = session.scalar(select(Model.id).where(Model.job_id == job.id).limit(1))
        record = dict(job.webhook_delivery or {})
        attempts = list(record.get("attempts", []))
        now = utcnow()
        delivery_id = record.get("delivery_id") or uuid.uuid4().hex
        body_value = payload(job, model_id, delivery_id, now)
        # what a tenant reads never names a server path (service.redact): a job's error may
        body_value = redactor_for(settings, session_factory).value(body_value, free=True)
        body = json.dumps(body_value, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "vfm-kt-webhook/1",
            SIGNATURE_HEADER: sign(job.webhook_secret or "", body),
            EVENT_HEADER: EVENT,
            DELIVERY_HEADER: delivery_id,
        }
        entry: dict[str, Any] = {"at": now.isoformat(), "status": job.status}
        try:
            check_url(job.webhook_url, settings)
            code = send(job.webhook_url, body, headers, settings.webhook_timeout_s)
            entry["response_status"] = code
            ok = 200 <= code < 300
            if not ok:
                entry["error"] = f"the receiver answered HTTP {code}"
        except WebhookRefused as err:
            entry["error"] = f"not sent: the URL {err}"[:MAX_ERROR_CHARS]
            ok = False
        except (OSError, ValueError) as err:
            entry["error"] = f"{type(err).__name__}: {err}"[:MAX_ERROR_CHARS]
            ok = False
        attempts.append(entry)
        record.update(delivery_id=delivery_id, attempts=attempts[-settings.webhook_attempts :])
        values: dict[str, Any] = {"webhook_delivery": record}
        if ok:
            record["delivered_at"] = now.isoformat()
            values.update(webhook_state="delivered", webhook_next_at=None)
        elif len(attempts) >= settings.webhook_attempts:
            values.update(webhook_state="failed", webhook_next_at=None)
        else:
            wait = settings.webhook_backoff_s * 2 ** (len(attempts) - 1)
            values.update(webhook_state="retrying", webhook_next_at=now + timedelta(seconds=wait))
        session.execute(
            update(Job).where(Job.id == job_id, Job.webhook_state == "sending").values(**values),
            execution_options={"synchronize_session": False},
        )
        session.commit()
        state = str(values["webhook_state"])
        log.info("job %s: webhook %s (%s)", job_id, state, entry.get("error") or entry.get("response_status"))
        return state


def dispatch_once(session_factory: sessionmaker[Session], settings: Settings) -> int:
    """Claim what is due and send it; the number of attempts made."""
    count = 0
    for job_id in claim_due(session_factory):
        try:
            deliver(session_factory, settings, job_id)
        except Exception:  # one bad row must not stop the others; its hold runs out, then a retry
            log.exception("job %s: webhook delivery failed unexpectedly", job_id)
        count += 1
    return count


def dispatch_periodically(settings: Settings, stop: threading.Event) -> None:
    """The API process's dispatcher thread (``service.app``), on an engine of its own: its looks
    never take a connection a request is waiting for (nor show among a request's statements)."""
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    try:
        while not stop.wait(settings.webhook_poll_interval_s):
            try:
                dispatch_once(session_factory, settings)
            except Exception:  # the database is down, or not migrated yet: the next look retries
                log.debug("webhook dispatch pass failed", exc_info=True)
    finally:
        engine.dispose()


def rearm(job: Job) -> dict[str, Any]:
    """The column values that make a retried job notify again when it ends again."""
    if not job.webhook_url:
        return {}
    return {"webhook_state": "waiting", "webhook_next_at": None, "webhook_delivery": None}

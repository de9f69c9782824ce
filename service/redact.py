"""What a tenant reads never names a place on the server.

Job errors, logs, model cards (their lineage holds the training config), transfer-set summaries,
manifests and reports are written by the worker with the server's own paths in them:
``<KT_DATA_DIR>/tenants/<tenant>/datasets/<id>/images``, ``<KT_DATA_DIR>/jobs/<id>/run/...``,
gallery folders, the Python installation in tracebacks. Those tell a tenant how the server is laid
out and other tenants' ids, so they are rewritten where they leave the service (the stored files
keep them: the worker reads manifests by path, and operators read logs on the server):

=============================================================  ===================================
``<data_dir>/tenants/<t>/datasets/<id>[/images]``               ``dataset:<id>``
``<data_dir>/jobs/<id>``                                        ``job:<id>``
``<data_dir>/galleries/<dir>``, a gallery's folder anywhere     ``gallery:<name>``
a gallery's source folder (``gallery.json``)                    ``gallery:<name>/sources/<i>``
``<data_dir>/registry/<name>[/model.safetensors]``              ``registered:<name>``
any other ``<data_dir>/...``                                    ``KT_DATA_DIR/...``
a ``KT_GALLERY_ROOTS`` folder                                   ``gallery-root:<its name>``
the project, site-packages, the Python installation, ``$HOME``  ``kt_train/...``, ``site-packages/...``,
                                                                ``python/...``, ``~/...``
=============================================================  ===================================

In free text the server wrote (job errors, API error messages, job logs, manifests) any absolute
path left after that becomes ``…/<its last name>``; elsewhere (a tenant's own names, HTML) only
the table applies. ``RedactPaths`` applies this to every JSON, plain-text and ``/ui`` HTML
response but those of ``/v1/admin`` (admin keys, which give server paths and are told the
gallery roots when one is refused); files (manifests, reports) are served from a redacted copy
made once beside them (``public_copy``).
"""

from __future__ import annotations

import json
import os
import re
import site
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.models import Gallery
from service.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Absolute paths the API itself answers with (routes in messages such as "POST /v1/jobs/x/retry").
API_PREFIXES = ("/v1/", "/ui/", "/docs", "/healthz", "/readyz", "/metrics", "/static/")
# Answered to admin keys only, about server paths they gave (gallery sources inside KT_GALLERY_ROOTS):
# the roots a refusal names are what the admin needs to fix the request.
OPERATOR_PREFIXES = ("/v1/admin/",)
# Free-text keys of JSON answers: written by the server, so any absolute path in them is one of its.
FREE_TEXT_KEYS = frozenset({"detail", "error", "warnings", "msg"})
# Bodies up to this size get their first look on the event loop (microseconds); larger ones in a thread.
INLINE_LOOK_BYTES = 64 * 1024
# Bodies larger than this pass unchanged (a listing of 1000 jobs is far smaller; logs are capped at 1 MB).
MAX_BODY_BYTES = 16 * 1024 * 1024
_NAME = r"[^/\s\"'<>`|\\,;()\[\]{}]"  # a character of a path component
_AFTER_ROOT = r"(?![\w.+@%~-])"  # a root ends at a component boundary: /data is not /database
_ABSOLUTE = rf"/(?:{_NAME}+/)+{_NAME}*"  # two components at least: "/healthz" alone is a route
_TEXT_PATH = re.compile(rf"(?<![\w.:/~\\-]){_ABSOLUTE}")
# In HTML a path inside an attribute (href="/ui/...") or a data: URI (base64,/9j/...) is not ours.
_HTML_PATH = re.compile(rf"(?<![\w.:/~\\,+=\"'-]){_ABSOLUTE}")


def public_name(name: str) -> str:
    """``name`` with nothing a JSON string, a CSV cell or HTML would need to escape."""
    return quote(name, safe="._-~")


@dataclass(frozen=True)
class Rule:
    """A regular expression and what each match becomes."""

    pattern: re.Pattern[str]
    replace: Callable[[re.Match[str]], str]

    def apply(self, text: str) -> str:
        return self.pattern.sub(self.replace, text)


def _literal(root: str, token: str) -> Rule:
    return Rule(re.compile(re.escape(root) + _AFTER_ROOT), lambda _m: token)


@lru_cache(maxsize=1)
def _python_roots() -> tuple[tuple[str, str], ...]:
    """Where Python and the installed packages live, as tracebacks name them."""
    roots: list[tuple[str, str]] = []
    packages = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib")} | set(site.getsitepackages())
    roots += [(p, "site-packages") for p in packages if p]
    roots += [
        (p, "python-lib") for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib")} if p
    ]
    roots += [(p, "python") for p in {sys.prefix, sys.base_prefix, sys.exec_prefix} if p and p != "/"]
    return tuple(roots)


@lru_cache(maxsize=16)
def _settings_rules(
    data_dir: str, gallery_roots: tuple[str, ...], galleries_dir_rule: bool
) -> tuple[Rule, ...]:
    """The rules that need nothing but the settings (built once per process and settings)."""
    d = re.escape(data_dir)
    seg = rf"({_NAME}+)"
    rules = [
        Rule(
            re.compile(rf"{d}/tenants/{_NAME}+/datasets/{seg}(?:/images{_AFTER_ROOT})?"),
            lambda m: f"dataset:{m[1]}",
        ),
        Rule(re.compile(rf"{d}/jobs/{seg}"), lambda m: f"job:{m[1]}"),
        Rule(
            re.compile(rf"{d}/registry/{seg}(?:/model\.safetensors{_AFTER_ROOT})?"),
            lambda m: f"registered:{m[1]}",
        ),
    ]
    # "free space in KT_DATA_DIR (/data)" (the worker's disk-full error) says enough without it
    rules.append(Rule(re.compile(rf"KT_DATA_DIR \({d}\)"), lambda _m: "KT_DATA_DIR"))
    if galleries_dir_rule:
        rules.append(Rule(re.compile(rf"{d}/galleries/{seg}"), lambda m: f"gallery:{m[1]}"))
    literal = [(data_dir, "KT_DATA_DIR")]
    literal += [(root, f"gallery-root:{public_name(Path(root).name)}") for root in gallery_roots]
    literal += [(str(PROJECT_ROOT), "."), *_python_roots()]
    home = os.path.expanduser("~")
    if home not in ("", "/", "~"):
        literal.append((home, "~"))
    # the longest root first: a site-packages inside the project is named as site-packages
    for root, token in sorted(set(literal), key=lambda item: -len(item[0])):
        rules.append(_literal(root, token))
    return tuple(rules)


_gallery_json_cache: dict[str, tuple[int, list[str]]] = {}
_gallery_json_lock = threading.Lock()


def gallery_sources(path: str) -> list[str]:
    """The source folders recorded in the gallery's ``gallery.json`` (cached until it changes)."""
    meta = Path(path) / "gallery.json"
    try:
        mtime = meta.stat().st_mtime_ns
    except OSError:
        return []
    with _gallery_json_lock:
        cached = _gallery_json_cache.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
        sources = [str(s["path"]) for s in doc.get("sources") or [] if isinstance(s, dict) and s.get("path")]
    except (OSError, ValueError, TypeError, KeyError):
        sources = []
    with _gallery_json_lock:
        _gallery_json_cache[path] = (mtime, sources)
    return sources


class Redactor:
    """Rewrites server paths for one answer (see the module docstring). ``galleries`` lists the
    ``(name, path)`` of every gallery; it is called at most once, and only when a text names a
    gallery folder or holds an absolute path no settings rule knows."""

    def __init__(self, settings: Settings, galleries: Callable[[], Iterable[tuple[str, str]]] | None = None):
        self.data_dir = str(settings.data_dir)
        roots = tuple(str(r) for r in settings.gallery_roots)
        self._base = _settings_rules(self.data_dir, roots, galleries_dir_rule=galleries is None)
        self._load_galleries = galleries
        self._gallery_rules: tuple[Rule, ...] | None = None if galleries is not None else ()
        self._roots = [self.data_dir, *roots, str(PROJECT_ROOT)]
        self._roots += [root for root, _ in _python_roots()]

    # --- what the gallery rows add

    def _galleries(self) -> tuple[Rule, ...]:
        if self._gallery_rules is None:
            named: list[tuple[str, str]] = []
            for name, path in self._load_galleries() if self._load_galleries else ():
                token = f"gallery:{public_name(name)}"
                named.append((path, token))
                for i, source in enumerate(gallery_sources(path)):
                    if not Path(source).is_relative_to(self.data_dir):  # those say dataset:<id>
                        named.append((source, f"{token}/sources/{i}"))
            rules = [_literal(p, t) for p, t in sorted(set(named), key=lambda item: -len(item[0])) if p]
            d = re.escape(self.data_dir)
            rules.append(Rule(re.compile(rf"{d}/galleries/({_NAME}+)"), lambda m: f"gallery:{m[1]}"))
            self._gallery_rules = tuple(rules)
        return self._gallery_rules

    def _rules(self, text: str, finder: re.Pattern[str]) -> tuple[Rule, ...]:
        """Every rule, the galleries' ones first; their rows are read only for a text that holds
        an absolute path (a gallery folder or source may be anywhere)."""
        if self._gallery_rules is None and any(
            not m[0].startswith(API_PREFIXES) for m in finder.finditer(text)
        ):
            self._galleries()
        return (*(self._gallery_rules or ()), *self._base)

    # --- text

    def might_name_paths(self, text: str) -> bool:
        """Cheap first look: could ``text`` hold a server path at all?"""
        if "/" not in text:
            return False
        if any(root in text for root in self._roots):
            return True
        return any(not m[0].startswith(API_PREFIXES) for m in _TEXT_PATH.finditer(text))

    def known(self, text: str, html: bool = False) -> str:
        """``text`` with the paths of the table rewritten; other text is left as it is."""
        if "/" not in text:
            return text
        for rule in self._rules(text, _HTML_PATH if html else _TEXT_PATH):
            text = rule.apply(text)
        return text

    def free(self, text: str, html: bool = False) -> str:
        """``known(text)``, then any absolute path left as ``…/<its last name>`` (text the server wrote)."""
        text = self.known(text, html)
        finder = _HTML_PATH if html else _TEXT_PATH

        def last_name(m: re.Match[str]) -> str:
            path = m[0]
            if path.startswith(API_PREFIXES):
                return path
            return "…/" + (path.rstrip("/").rsplit("/", 1)[-1] or "")

        return finder.sub(last_name, text) if "/" in text else text

    def value(self, value: Any, free: bool = False) -> Any:
        """A JSON value with its strings rewritten: ``free`` ones (under ``FREE_TEXT_KEYS``, or all
        of them when ``free``) as free text, the others with the table only."""
        if isinstance(value, str):
            return self.free(value) if free else self.known(value)
        if isinstance(value, list):
            return [self.value(v, free) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v, free or k in FREE_TEXT_KEYS) for k, v in value.items()}
        return value


def gallery_lister(session_factory: sessionmaker[Session]) -> Callable[[], list[tuple[str, str]]]:
    """``(name, path)`` of every gallery, read in a session of its own."""

    def galleries() -> list[tuple[str, str]]:
        with session_factory() as session:
            return [(str(n), str(p)) for n, p in session.execute(select(Gallery.name, Gallery.path)).all()]

    return galleries


def redactor_for(settings: Settings, session_factory: sessionmaker[Session] | None) -> Redactor:
    return Redactor(settings, gallery_lister(session_factory) if session_factory is not None else None)


def session_redactor(settings: Settings, session: Session) -> Redactor:
    """A ``Redactor`` that reads the galleries in ``session`` (a route's own)."""

    def galleries() -> list[tuple[str, str]]:
        return [(str(n), str(p)) for n, p in session.execute(select(Gallery.name, Gallery.path)).all()]

    return Redactor(settings, galleries)


# --------------------------------------------------------------------------- files


PUBLIC_DIR = ".public"


def public_copy(path: Path, redactor: Redactor) -> Path:
    """A redacted copy of the manifest or report ``path`` (``.jsonl``, ``.csv``, ``.parquet``,
    ``.html``), made beside it in ``.public/`` the first time it is asked for (and again when the
    original is newer), written to a temp file and renamed into place, so concurrent requests
    never see half of one. Served instead of the original: the worker keeps reading the original."""
    dest = path.parent / PUBLIC_DIR / path.name
    try:
        if dest.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            return dest
    except FileNotFoundError:
        pass
    dest.parent.mkdir(exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            _redact_parquet(path, tmp, redactor)
        else:
            html = suffix in (".html", ".htm")
            with (
                open(path, encoding="utf-8", errors="replace", newline="") as fin,
                open(tmp, "w", encoding="utf-8", newline="") as fout,
            ):
                for line in fin:
                    fout.write(redactor.known(line, html=True) if html else redactor.free(line))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _redact_parquet(src: Path, dest: Path, redactor: Redactor) -> None:
    """Each text column rewritten value by value (the distinct values only: a ``source`` column
    holds a few folders over and over)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    for i, field in enumerate(table.schema):
        if not pa.types.is_string(field.type) and not pa.types.is_large_string(field.type):
            continue
        column = pc.dictionary_encode(table.column(i).combine_chunks())
        words = [None if w is None else redactor.free(w) for w in column.dictionary.to_pylist()]
        fixed = pa.DictionaryArray.from_arrays(column.indices, pa.array(words, field.type)).cast(field.type)
        table = table.set_column(i, field, fixed)
    pq.write_table(table, dest)


# --------------------------------------------------------------------------- the middleware

_REDACTED_TYPES = ("application/json", "text/plain", "text/html")


class RedactPaths:
    """Rewrites server paths in every JSON and plain-text answer and every ``/ui`` page (see the
    module docstring). Reports and manifests are files served from their ``public_copy`` and pass
    as they are, as do answers that name no path at all (a look for the data dir and for absolute
    paths, before any work); the rewrite runs in the threadpool, never on the event loop."""

    def __init__(self, app: ASGIApp, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.app = app
        self.settings = settings
        self.session_factory = session_factory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path or path.endswith(("/report", "/openapi.json")) or path.startswith(OPERATOR_PREFIXES):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        passing = False

        async def capture(message: Message) -> None:
            nonlocal start, passing
            if passing:
                await send(message)
                return
            if message["type"] == "http.response.start":
                start = message
                headers = dict(message.get("headers") or [])
                kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
                length = int(headers.get(b"content-length", b"0") or 0)
                if (
                    kind not in _REDACTED_TYPES
                    or (kind == "text/html" and not path.startswith("/ui"))
                    or (length > MAX_BODY_BYTES)
                ):
                    passing = True
                    await send(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                if sum(map(len, chunks)) > MAX_BODY_BYTES:  # a stream with no length: let it pass
                    passing = True
                    assert start is not None
                    await send(start)
                    await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                return
            assert start is not None
            body = b"".join(chunks)
            redacted = await self._redacted(body, dict(start.get("headers") or []))
            if redacted is not body:  # (a HEAD answer has no body and keeps its length)
                out = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
                start = {**start, "headers": [*out, (b"content-length", str(len(redacted)).encode())]}
            await send(start)
            await send({"type": "http.response.body", "body": redacted})

        await self.app(scope, receive, capture)

    async def _redacted(self, body: bytes, headers: dict[bytes, bytes]) -> bytes:
        redactor = redactor_for(self.settings, self.session_factory)
        kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
        if len(body) > INLINE_LOOK_BYTES:  # even the first look would hold up the event loop
            return await run_in_threadpool(_rewrite, redactor, body, kind)
        if not redactor.might_name_paths(body.decode("utf-8", errors="replace")):
            return body  # the usual case (a status poll): no thread, no copy
        return await run_in_threadpool(_rewrite, redactor, body, kind)


def _rewrite(redactor: Redactor, body: bytes, kind: str) -> bytes:
    text = body.decode("utf-8", errors="replace")
    if not redactor.might_name_paths(text):
        return body
    if kind == "application/json":
        try:
            value = json.loads(text)
        except ValueError:
            return redactor.free(text).encode()
        return json.dumps(redactor.value(value), ensure_ascii=False, separators=(",", ":")).encode()
    if kind == "text/html":
        return redactor.known(text, html=True).encode()
    return redactor.free(text).encode()

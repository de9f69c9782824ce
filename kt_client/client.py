"""``Client`` and ``AsyncClient``: the vfm-kt HTTP API in Python (httpx).

    from kt_client import Client

    with Client() as kt:  # KT_API_URL / KT_API_KEY, or the `kt login`
        ds = kt.datasets.upload("data/train", progress=lambda sent, total: ...)
        job = kt.jobs.submit({"dataset_id": ds["id"], "teacher": "timm:vit_small_patch14_dinov2.lvd142m"})
        job = kt.jobs.wait(job["id"], callback=lambda j: print(j["stage"], j["progress"]))
        kt.models.download(job["model_id"], format="onnx", dest="model.onnx")

Every method returns the server's JSON (dicts and lists). An error answer raises an ``APIError``
subclass carrying the status code and the server's ``detail`` message verbatim; no answer at all
raises ``ServerUnreachable``. A 429 is retried after its ``Retry-After`` (bounded); so is a 503
with ``Retry-After`` to a dataset upload (every upload turn of the server taken: it read and kept
nothing); connection errors are retried for GETs only (they are idempotent).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import random
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kt_client.config import resolve
from kt_client.errors import APIError, DownloadFailed, ServerUnreachable, error_for

API_PREFIX = "/v1"
TERMINAL = ("succeeded", "failed", "canceled")
CHUNK = 256 * 1024

ProgressCallback = Callable[[int, int], None]
"""``progress(sent_bytes, total_bytes)`` during an upload."""
JobCallback = Callable[[dict[str, Any]], None]
"""``callback(job)`` after each poll of ``jobs.wait``."""


# --- uploads: a directory is zipped to a temp file; the body is streamed with a known length


def zip_directory(folder: Path, dest: Path) -> Path:
    """Zip ``folder``'s files (class folders of images) with paths relative to it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder} holds no files; point at a folder of class folders of images")
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in files:
            zf.write(path, path.relative_to(folder).as_posix())
    return dest


@contextlib.contextmanager
def upload_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``path`` itself for a zip; for a directory, a temp zip of it (removed afterwards)."""
    path = Path(path).expanduser()
    if path.is_dir():
        fd, tmp = tempfile.mkstemp(prefix=f"kt-upload-{path.name}-", suffix=".zip")
        os.close(fd)
        try:
            yield zip_directory(path, Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)
    elif path.is_file():
        yield path
    else:
        raise FileNotFoundError(f"{path} does not exist; pass a folder of class folders or a .zip")


@dataclass(frozen=True)
class _Multipart:
    """A ``multipart/form-data`` body of one file field and text fields, streamed from disk."""

    path: Path
    filename: str
    fields: dict[str, str]
    boundary: str

    def _head(self) -> bytes:
        parts = [
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in self.fields.items()
        ]
        name = self.filename.replace('"', "%22")
        parts.append(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/zip\r\n\r\n".encode()
        )
        return b"".join(parts)

    def _tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    @property
    def headers(self) -> dict[str, str]:
        length = len(self._head()) + self.file_size + len(self._tail())
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(length),
        }

    def chunks(self, progress: ProgressCallback | None) -> Iterator[bytes]:
        total, sent = self.file_size, 0
        yield self._head()
        if progress:
            progress(0, total)
        with open(self.path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                sent += len(chunk)
                yield chunk
                if progress:
                    progress(sent, total)
        yield self._tail()

    async def achunks(self, progress: ProgressCallback | None) -> AsyncIterator[bytes]:
        for chunk in self.chunks(progress):
            yield chunk


def _multipart(path: Path, name: str | None, filename: str, task: str | None = None) -> _Multipart:
    fields = {"name": name} if name else {}
    if task:
        fields["task"] = task
    return _Multipart(path=path, filename=filename, fields=fields, boundary=uuid.uuid4().hex)


# --- shared request logic


def _retry_after(resp: httpx.Response, default: float) -> float:
    value = resp.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return default


def card_path(model_path: str | os.PathLike[str]) -> Path:
    """Where a downloaded model's card goes: ``<file stem>.model_card.json`` beside it (the name
    ``kt_train.predict.CARD_SUFFIX`` looks for; not ``.card.json``, a teacher weights card's name)."""
    path = Path(model_path)
    return path.with_name(path.stem + ".model_card.json")


def _dest_for(dest: str | os.PathLike[str] | None, default_name: str) -> Path:
    if dest is None:
        return Path(default_name)
    path = Path(dest).expanduser()
    return path / default_name if path.is_dir() else path


class _Base:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
        max_retry_wait_s: float = 30.0,
        connect_retries: int = 2,
    ) -> None:
        creds = resolve(base_url, api_key)
        self.base_url = creds.url
        self.api_key = creds.api_key
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.connect_retries = connect_retries
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._headers = {"User-Agent": "kt-client"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"

    def _url(self, path: str) -> str:
        return path if path.startswith(("/v1/", "/readyz", "/healthz")) else API_PREFIX + path

    def _wait_s(self, resp: httpx.Response | None, attempt: int, busy_ok: bool = False) -> float | None:
        """Seconds to wait before retrying, or None to give up. ``resp`` None: a connection error
        (retried ``connect_retries`` times, with a short backoff: a server that is down answers fast).
        ``busy_ok``: the request may be sent again after a 503 with ``Retry-After``."""
        if resp is None:
            if attempt >= self.connect_retries:
                return None
            return min(self.max_retry_wait_s, 0.5 * 2**attempt) * (0.5 + random.random() / 2)
        if resp.status_code == 429 and attempt < self.max_retries:
            return min(self.max_retry_wait_s, _retry_after(resp, 1.0))
        if (
            resp.status_code == 503
            and busy_ok
            and "Retry-After" in resp.headers
            and attempt < self.max_retries
        ):
            # the wait it asks for and up to a quarter more, so that the clients it refused together
            # do not all come back together
            return min(self.max_retry_wait_s, _retry_after(resp, 1.0) * (1 + random.random() / 4))
        return None

    def _unreachable(self, method: str, path: str, err: Exception) -> ServerUnreachable:
        return ServerUnreachable(
            f"Cannot reach the vfm-kt server at {self.base_url} ({method} {path}: {type(err).__name__}: {err}); "
            "is it running (`kt serve`) and is the URL right (`kt login URL`, KT_API_URL)?"
        )

    def _broke_off(self, path: str, dest: Path, received: int, err: Exception) -> DownloadFailed:
        return DownloadFailed(
            f"The download of {path} from {self.base_url} broke off after {received} bytes "
            f"({type(err).__name__}: {err}); nothing was saved to {dest}; run it again."
        )


# --- sync


class Client(_Base):
    """The vfm-kt API, synchronously. ``base_url``/``api_key`` default to KT_API_URL/KT_API_KEY, then
    the saved ``kt login``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
        max_retry_wait_s: float = 30.0,
        connect_retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait_s=max_retry_wait_s,
            connect_retries=connect_retries,
        )
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=transport
        )
        self.datasets = Datasets(self)
        self.transfer_sets = TransferSets(self)
        self.jobs = Jobs(self)
        self.models = Models(self)
        self.galleries = Galleries(self)
        self.registered_models = RegisteredModels(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        body: Callable[[], Iterator[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        busy_ok: bool = False,
    ) -> httpx.Response:
        """One API call with the retries; raises ``APIError``/``ServerUnreachable``. ``body``: a
        factory of the streamed request body (called again for a retry). ``busy_ok``: retry a 503
        with ``Retry-After`` too (the caller knows that the server then did nothing with it)."""
        url = self._url(path)
        attempt = 0
        while True:
            req = self._http.build_request(
                method, url, params=params, json=json, headers=headers, content=body() if body else None
            )
            try:
                resp = self._http.send(req, stream=stream)
            except httpx.TransportError as err:
                wait = self._wait_s(None, attempt) if method == "GET" else None
                if wait is None:
                    raise self._unreachable(method, url, err) from err
                time.sleep(wait)
                attempt += 1
                continue
            if resp.status_code < 400:
                return resp
            content = resp.read()
            resp.close()
            wait = self._wait_s(resp, attempt, busy_ok)
            if wait is None:
                raise error_for(resp.status_code, content, method=method, url=str(req.url))
            time.sleep(wait)
            attempt += 1

    def get_json(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post_json(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body).json()

    def download(self, path: str, dest: Path, params: dict[str, Any] | None = None) -> Path:
        """Stream ``path`` to ``dest`` (a temp file beside it, renamed when complete)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        resp = self.request("GET", path, params=params, stream=True)
        try:
            with open(tmp, "wb") as fh:
                for chunk in resp.iter_bytes(CHUNK):
                    fh.write(chunk)
            os.replace(tmp, dest)
        except httpx.TransportError as err:
            raise self._broke_off(path, dest, resp.num_bytes_downloaded, err) from err
        finally:
            resp.close()
            tmp.unlink(missing_ok=True)
        return dest

    def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False


class Datasets:
    def __init__(self, client: Client) -> None:
        self._c = client

    def upload(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        progress: ProgressCallback | None = None,
        task: str | None = None,
    ) -> dict[str, Any]:
        """Upload a .zip, or a folder of class folders (zipped on the fly to a temp file);
        ``task="segmentation"``: images/ + masks/ + classes.json (docs/uploads.md)."""
        src = Path(path).expanduser()
        with upload_file(src) as zip_path:
            form = _multipart(zip_path, name, src.name if src.suffix == ".zip" else f"{src.name}.zip", task)
            resp = self._c.request(
                "POST", "/datasets", body=lambda: form.chunks(progress), headers=form.headers, busy_ok=True
            )
        return dict(resp.json())

    def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        return list(self._c.get_json("/datasets", limit=limit, offset=offset)["data"])

    def get(self, dataset_id: str) -> dict[str, Any]:
        return dict(self._c.get_json(f"/datasets/{dataset_id}"))

    def delete(self, dataset_id: str, cascade: bool = False) -> None:
        """Delete a dataset. The server refuses (``Conflict``, 409) while transfer sets, jobs'
        curated sets or galleries made from its images exist; ``cascade=True`` deletes those too."""
        self._c.request("DELETE", f"/datasets/{dataset_id}", params={"cascade": "true"} if cascade else None)


class TransferSets:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, dataset_id: str, gallery_id: str, **params: Any) -> dict[str, Any]:
        """Curate a transfer set (a job: ``jobs.wait(ts["job_id"])``). ``params``: size, method, ..."""
        body = {"dataset_id": dataset_id, "gallery_id": gallery_id, **params}
        return dict(self._c.post_json("/transfer-sets", body))

    def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        return list(self._c.get_json("/transfer-sets", limit=limit, offset=offset)["data"])

    def get(self, transfer_set_id: str) -> dict[str, Any]:
        return dict(self._c.get_json(f"/transfer-sets/{transfer_set_id}"))

    def manifest(
        self, transfer_set_id: str, format: str = "jsonl", dest: str | os.PathLike[str] | None = None
    ) -> Path:
        """Download the manifest (jsonl, csv or parquet) to ``dest`` (a file or a folder)."""
        path = _dest_for(dest, f"transfer-set-{transfer_set_id}.{format}")
        return self._c.download(f"/transfer-sets/{transfer_set_id}/manifest", path, {"format": format})

    def report(self, transfer_set_id: str, dest: str | os.PathLike[str] | None = None) -> Path:
        """Download the HTML report to ``dest`` (a file or a folder)."""
        path = _dest_for(dest, f"transfer-set-{transfer_set_id}.html")
        return self._c.download(f"/transfer-sets/{transfer_set_id}/report", path)


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Queue a training job (``POST /v1/jobs``; the body's fields are in docs/api.md)."""
        return dict(self._c.post_json("/jobs", body))

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._c.get_json(f"/jobs/{job_id}"))

    def list(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> builtins.list[dict[str, Any]]:
        return list(self._c.get_json("/jobs", status=status, limit=limit, offset=offset)["data"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._c.post_json(f"/jobs/{job_id}/cancel"))

    def retry(self, job_id: str) -> dict[str, Any]:
        return dict(self._c.post_json(f"/jobs/{job_id}/retry"))

    def logs(self, job_id: str) -> str:
        return self._c.request("GET", f"/jobs/{job_id}/logs").text

    def events(self, job_id: str, *, poll_s: float = 1.0) -> Iterator[dict[str, Any]]:
        """The job as the server streams it (``GET /v1/jobs/{id}/events``): one dict at once and one
        each time it changes, until it has ended."""
        response = self._c.request("GET", f"/jobs/{job_id}/events", params={"poll_s": poll_s}, stream=True)
        with contextlib.closing(response):
            event, data = "message", ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                elif not line and data:
                    if event == "job":
                        yield dict(json.loads(data))
                    elif event == "end":
                        return
                    event, data = "message", ""

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout: float | None = None,
        callback: JobCallback | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or canceled; returns it. ``TimeoutError`` after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if callback:
                callback(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:g} s (status {job['status']})")
            time.sleep(poll_s)


class Models:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        return list(self._c.get_json("/models", limit=limit, offset=offset)["data"])

    def get(self, model_id: str) -> dict[str, Any]:
        """The model card and its downloadable ``formats``."""
        return dict(self._c.get_json(f"/models/{model_id}"))

    def download(
        self,
        model_id: str,
        format: str = "safetensors",
        dest: str | os.PathLike[str] | None = None,
        *,
        card: bool = False,
    ) -> Path:
        """Download one exported format (safetensors, onnx, torchscript) to ``dest`` (file or folder).

        ``card=True`` also writes the model card beside it as ``<file stem>.model_card.json``, where
        ``kt predict`` (``kt_train.predict``) finds it."""
        suffix = {"torchscript": "pt"}.get(format, format)
        path = _dest_for(dest, f"model-{model_id}.{suffix}")
        path = self._c.download(f"/models/{model_id}/download", path, {"format": format})
        if card:
            card_path(path).write_text(
                json.dumps(self.get(model_id)["card"], indent=2) + "\n", encoding="utf-8"
            )
        return path

    def predict(
        self,
        model_id: str,
        images: str | os.PathLike[str] | builtins.list[str | os.PathLike[str]],
        *,
        format: str = "onnx",
        dest: str | os.PathLike[str] | None = None,
        top_k: int = 5,
    ) -> builtins.list[dict[str, Any]]:
        """Predict ``images`` (files, folders, zips) on this machine with the model's ``format`` file,
        preprocessed exactly as its card says: ``{path, label, prob, top_k}`` per image.

        Runs ``kt_train.predict.predict_files``, so it needs the training library (torch, timm,
        onnxruntime). The file is downloaded into the folder ``dest`` (a temporary one by default)."""
        from kt_train.predict import predict_files  # here: importing kt_client must not import torch

        paths = [os.fspath(p) for p in images] if isinstance(images, builtins.list) else [os.fspath(images)]
        meta = self.get(model_id)["card"]
        with contextlib.ExitStack() as stack:
            folder = (
                Path(dest) if dest is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            )
            folder.mkdir(parents=True, exist_ok=True)
            path = self.download(model_id, format, folder)
            return [p.to_dict() for p in predict_files(path, meta, paths, format=format, top_k=top_k)]


class Galleries:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> builtins.list[dict[str, Any]]:
        return list(self._c.get_json("/galleries")["data"])


class RegisteredModels:
    """Teacher weights an operator registered (`kt admin register-model`) that you may name as a
    teacher or gallery encoder: each row's ``spec`` (``timm:<arch>@registered:<name>``)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        return list(self._c.get_json("/registered-models", limit=limit, offset=offset)["data"])


# --- async


class AsyncClient(_Base):
    """The vfm-kt API with ``async``/``await``; the same resources and methods as ``Client``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
        max_retry_wait_s: float = 30.0,
        connect_retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait_s=max_retry_wait_s,
            connect_retries=connect_retries,
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=self._timeout, transport=transport
        )
        self.datasets = AsyncDatasets(self)
        self.transfer_sets = AsyncTransferSets(self)
        self.jobs = AsyncJobs(self)
        self.models = AsyncModels(self)
        self.galleries = AsyncGalleries(self)
        self.registered_models = AsyncRegisteredModels(self)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        body: Callable[[], AsyncIterator[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        busy_ok: bool = False,
    ) -> httpx.Response:
        url = self._url(path)
        attempt = 0
        while True:
            req = self._http.build_request(
                method, url, params=params, json=json, headers=headers, content=body() if body else None
            )
            try:
                resp = await self._http.send(req, stream=stream)
            except httpx.TransportError as err:
                wait = self._wait_s(None, attempt) if method == "GET" else None
                if wait is None:
                    raise self._unreachable(method, url, err) from err
                await asyncio.sleep(wait)
                attempt += 1
                continue
            if resp.status_code < 400:
                return resp
            content = await resp.aread()
            await resp.aclose()
            wait = self._wait_s(resp, attempt, busy_ok)
            if wait is None:
                raise error_for(resp.status_code, content, method=method, url=str(req.url))
            await asyncio.sleep(wait)
            attempt += 1

    async def get_json(self, path: str, **params: Any) -> Any:
        resp = await self.request("GET", path, params={k: v for k, v in params.items() if v is not None})
        return resp.json()

    async def post_json(self, path: str, body: Any = None) -> Any:
        return (await self.request("POST", path, json=body)).json()

    async def download(self, path: str, dest: Path, params: dict[str, Any] | None = None) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        resp = await self.request("GET", path, params=params, stream=True)
        try:
            with open(tmp, "wb") as fh:
                async for chunk in resp.aiter_bytes(CHUNK):
                    fh.write(chunk)
            os.replace(tmp, dest)
        except httpx.TransportError as err:
            raise self._broke_off(path, dest, resp.num_bytes_downloaded, err) from err
        finally:
            await resp.aclose()
            tmp.unlink(missing_ok=True)
        return dest


class AsyncDatasets:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(
        self, path: str | os.PathLike[str], name: str | None = None, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        src = Path(path).expanduser()
        with upload_file(src) as zip_path:
            form = _multipart(zip_path, name, src.name if src.suffix == ".zip" else f"{src.name}.zip")
            resp = await self._c.request(
                "POST", "/datasets", body=lambda: form.achunks(progress), headers=form.headers, busy_ok=True
            )
        return dict(resp.json())

    async def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        return list((await self._c.get_json("/datasets", limit=limit, offset=offset))["data"])

    async def get(self, dataset_id: str) -> dict[str, Any]:
        return dict(await self._c.get_json(f"/datasets/{dataset_id}"))

    async def delete(self, dataset_id: str, cascade: bool = False) -> None:
        await self._c.request(
            "DELETE", f"/datasets/{dataset_id}", params={"cascade": "true"} if cascade else None
        )


class AsyncTransferSets:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, dataset_id: str, gallery_id: str, **params: Any) -> dict[str, Any]:
        body = {"dataset_id": dataset_id, "gallery_id": gallery_id, **params}
        return dict(await self._c.post_json("/transfer-sets", body))

    async def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        return list((await self._c.get_json("/transfer-sets", limit=limit, offset=offset))["data"])

    async def get(self, transfer_set_id: str) -> dict[str, Any]:
        return dict(await self._c.get_json(f"/transfer-sets/{transfer_set_id}"))

    async def manifest(
        self, transfer_set_id: str, format: str = "jsonl", dest: str | os.PathLike[str] | None = None
    ) -> Path:
        path = _dest_for(dest, f"transfer-set-{transfer_set_id}.{format}")
        return await self._c.download(f"/transfer-sets/{transfer_set_id}/manifest", path, {"format": format})

    async def report(self, transfer_set_id: str, dest: str | os.PathLike[str] | None = None) -> Path:
        path = _dest_for(dest, f"transfer-set-{transfer_set_id}.html")
        return await self._c.download(f"/transfer-sets/{transfer_set_id}/report", path)


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._c.post_json("/jobs", body))

    async def get(self, job_id: str) -> dict[str, Any]:
        return dict(await self._c.get_json(f"/jobs/{job_id}"))

    async def list(
        self, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> builtins.list[dict[str, Any]]:
        return list((await self._c.get_json("/jobs", status=status, limit=limit, offset=offset))["data"])

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(await self._c.post_json(f"/jobs/{job_id}/cancel"))

    async def retry(self, job_id: str) -> dict[str, Any]:
        return dict(await self._c.post_json(f"/jobs/{job_id}/retry"))

    async def logs(self, job_id: str) -> str:
        return (await self._c.request("GET", f"/jobs/{job_id}/logs")).text

    async def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout: float | None = None,
        callback: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if callback:
                result = callback(job)
                if asyncio.iscoroutine(result):
                    await result
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:g} s (status {job['status']})")
            await asyncio.sleep(poll_s)


class AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        return list((await self._c.get_json("/models", limit=limit, offset=offset))["data"])

    async def get(self, model_id: str) -> dict[str, Any]:
        return dict(await self._c.get_json(f"/models/{model_id}"))

    async def download(
        self, model_id: str, format: str = "safetensors", dest: str | os.PathLike[str] | None = None
    ) -> Path:
        suffix = {"torchscript": "pt"}.get(format, format)
        path = _dest_for(dest, f"model-{model_id}.{suffix}")
        return await self._c.download(f"/models/{model_id}/download", path, {"format": format})


class AsyncGalleries:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> builtins.list[dict[str, Any]]:
        return list((await self._c.get_json("/galleries"))["data"])


class AsyncRegisteredModels:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self, limit: int = 100, offset: int = 0) -> builtins.list[dict[str, Any]]:
        data = await self._c.get_json("/registered-models", limit=limit, offset=offset)
        return list(data["data"])


__all__ = ["TERMINAL", "APIError", "AsyncClient", "Client", "ServerUnreachable", "zip_directory"]

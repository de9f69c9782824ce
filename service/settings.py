"""Service configuration: one ``Settings`` object, read from ``KT_*`` environment variables (or a
``.env`` file). The embedded default (SQLite database, SQLite-backed Celery broker and result
backend, all under ``data_dir``) needs nothing but Python packages; production points the URLs
at PostgreSQL and Redis.
"""

from __future__ import annotations

import ipaddress
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Values that mean "nobody set a secret"; refused outside development.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "changethis", "secret", "dev", "development"})
DEFAULT_SECRET_KEY = "changethis"


class Settings(BaseSettings):
    """Service settings. Each field ``foo`` is read from the environment variable ``KT_FOO``."""

    model_config = SettingsConfigDict(
        env_prefix="KT_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    environment: Literal["development", "production"] = Field(
        default="development",
        description="`development` allows placeholder secrets; `production` refuses them.",
    )
    data_dir: Path = Field(
        default=Path("./kt-data"),
        description="Local artifact directory: uploads, datasets, galleries, transfer sets, models, and the "
        "embedded SQLite databases.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL of the service database. Default: `sqlite:///<data_dir>/kt.db`. "
        "Production: `postgresql+psycopg://user:password@host/db`.",
    )
    broker_url: str = Field(
        default="",
        description="Celery broker URL. Default: a SQLite-backed broker `sqla+sqlite:///<data_dir>/broker.db`. "
        "Production: `redis://host:6379/0`.",
    )
    result_backend: str = Field(
        default="",
        description="Celery result backend URL. Default: `db+sqlite:///<data_dir>/results.db`. "
        "The job row in the database stays the source of truth; this only carries live task state.",
    )
    secret_key: str = Field(
        default=DEFAULT_SECRET_KEY,
        description="Server secret (e.g. for signing download links). Must be set to a real value outside "
        "development.",
    )
    max_upload_bytes: int = Field(
        default=2 * 1024**3, gt=0, description="Largest accepted upload, in bytes (default 2 GiB)."
    )
    max_model_bytes: int = Field(
        default=2 * 1024**3,
        gt=0,
        description="Largest weights file `kt admin register-model` accepts, in bytes (default 2 GiB).",
    )
    max_upload_files: int = Field(
        default=100_000, gt=0, description="Most files accepted in one dataset upload (archive entries)."
    )
    max_image_pixels: int = Field(
        default=89_478_485,
        gt=0,
        description="Largest image accepted, in pixels (width × height); PIL's decompression-bomb default.",
    )
    ingest_processes: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Processes of each API process that validate and store uploaded zips (0: the API "
        "process's own threadpool). Decoding every image of an upload takes CPU that status requests "
        "would otherwise wait behind (service.ingest).",
    )
    ingest_nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="CPU niceness of the ingest processes: the API's requests go first.",
    )
    db_pool_size: int = Field(
        default=20,
        ge=1,
        le=200,
        description="PostgreSQL connections each API process keeps open. Status requests run in a "
        "threadpool of 40; with too few connections the overflow ones are opened and closed per "
        "request (a new server process each) and requests queue for them under load.",
    )
    db_max_overflow: int = Field(
        default=20,
        ge=0,
        le=200,
        description="PostgreSQL connections an API process may open past `KT_DB_POOL_SIZE` at a peak "
        "(closed again when returned). Size both with the server's `max_connections` and the number "
        "of API processes in mind.",
    )
    gil_switch_interval_ms: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="The API process's `sys.setswitchinterval`, ms (null: Python's 5 ms). How long a "
        "thread that wants the GIL waits for the running one to let go: status requests run in the "
        "threadpool beside the event loop and take the GIL back after each database round trip.",
    )
    concurrent_uploads: int = Field(
        default=2,
        ge=1,
        description="Dataset uploads each API process receives and validates at once (service.uploads."
        "UploadGate); the next ones wait for a turn, their bodies unread (the client's sending pauses). "
        "Bounds the CPU and temp disk that uploads take from the process.",
    )
    upload_queue: int = Field(
        default=16,
        ge=0,
        description="Uploads that may wait for a turn in each API process; one more answers 503 with "
        "`Retry-After` at once, nothing read or kept (the `kt` client sends it again after the wait).",
    )
    upload_queue_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds an upload waits for a turn before it answers 503 with `Retry-After` (0: "
        "none waits). Keep it well below the clients' write timeout (the `kt` client's is 120 s).",
    )
    upload_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds an upload's body may send nothing before the API stops waiting for it (408, "
        "nothing kept), so that a stalled client does not keep an upload turn for ever.",
    )
    upload_pace_ms: float = Field(
        default=2.0,
        ge=0,
        description="When an API process is busy for its uploads (service.uploads.UploadPacer): after "
        "each chunk of an upload's body the upload lets the event loop run whatever else is ready; when "
        "that took longer than this many milliseconds, or another request's handler is running in the "
        "threadpool (a status poll), the chunk counts against `upload_busy_mb_s`. 0 turns pacing off: "
        "uploads always read at full speed.",
    )
    upload_busy_mb_s: float = Field(
        default=4.0,
        ge=0,
        description="MiB a second that the uploads of one API process read together while it is busy "
        "(`upload_pace_ms`); an idle process reads them at full speed. The unread rest waits in the "
        "socket, so that short requests such as status polls go first. 0 turns pacing off.",
    )
    worker_nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="CPU niceness a worker process takes at start: on a machine it shares with the API "
        "(`kt serve`, a small box), the API's requests go first and training takes the rest of the cores.",
    )
    max_classes: int = Field(
        default=10_000,
        gt=0,
        description="Most classes (folders, or labels in labels.csv) accepted in one dataset upload.",
    )
    max_compression_ratio: int = Field(
        default=100,
        gt=1,
        description="An archive entry of 1 MiB or more that expands more than this many times its "
        "compressed size is refused as a zip bomb (images barely compress).",
    )
    default_queue: Literal["cpu", "gpu"] = Field(
        default="cpu",
        description="Celery queue of jobs whose request names no device (`device: cuda` always goes to "
        "`gpu`, `device: cpu` to `cpu`). Set `gpu` where GPU workers should take every job.",
    )
    # per-stage queues (issue 16 part 3): a pipeline job is a chain of stage tasks (worker.tasks)
    stage_queues: Annotated[dict[str, Literal["cpu", "gpu"]], NoDecode] = Field(
        default_factory=dict,
        description="The queue each stage of a pipeline job runs on, for jobs whose request names no "
        "device: a JSON object or `stage=queue` pairs separated by `,`, e.g. `curate=cpu,distill=gpu`. "
        "A stage it does not name runs on `default_queue`; a job that names a device (`cpu`, `cuda`) "
        "runs every stage on that device's queue. Empty (the default): every stage runs where the job "
        "was queued, one stage after the other on the worker that started it.",
    )
    job_heartbeat_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A running job whose worker wrote no heartbeat for this long is taken as lost: the "
        "reaper (in every worker) requeues it, or fails it after `job_max_attempts` attempts.",
    )
    job_max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts a job gets before a lost worker fails it instead of requeueing it.",
    )
    reaper_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="Seconds between two looks of a worker's reaper for lost jobs (0: no reaper in this worker).",
    )
    worker_heartbeat_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A worker process that wrote no heartbeat (`workers` table, written every quarter of "
        "this) for this long is not counted as alive by `/readyz`; a distributed gallery build's step "
        "whose beat was silent this long is sent back to its queue (`worker.gallery_tasks.Watch`).",
    )
    ready_min_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        default="auto",
        description="Workers that must be alive for `/readyz` to answer 200. `auto`: at least one once "
        "any worker has died or gone silent in the last day (a deployment whose workers stopped cleanly, "
        "or never started, is not held unready); a number N: N (`kt serve` sets 1 when it runs workers); "
        "0: workers never make `/readyz` fail (it still reports how many are alive).",
    )
    rate_limit_per_min: float = Field(
        default=600.0,
        ge=0,
        description="Requests a minute each API key may make on average (a token bucket per key, per API "
        "process: with N processes the effective limit is N times this); past it, 429 with `Retry-After`. "
        "0 turns the limit off. /healthz, /readyz and /metrics are never limited.",
    )
    rate_limit_burst: int = Field(
        default=100,
        ge=1,
        description="Requests an API key may make at once, above its per-minute average (the bucket's size).",
    )
    auth_failures_per_min: float = Field(
        default=60.0,
        ge=0,
        description="Failed authentications (a malformed, unknown or revoked API key, an ended `/ui` "
        "session) a client address may make a minute on average, per API process; past it (and "
        "`auth_failures_burst`), that address gets 429 with `Retry-After` before any key lookup, until "
        "the bucket refills. 0 turns the limit off.",
    )
    auth_failures_burst: int = Field(
        default=60,
        ge=1,
        description="Failed authentications a client address may make at once, above its per-minute average.",
    )
    thumbnail_decodes: int = Field(
        default=1,
        ge=1,
        description="Images the API decodes at once to make `/ui` dataset thumbnails (each made once, "
        "then cached under the dataset's directory); one decode needs up to 4 bytes a pixel of "
        "`max_image_pixels` (~360 MB at the default), so this bounds the memory thumbnails take.",
    )
    max_running_jobs_per_tenant: int = Field(
        default=2,
        ge=0,
        description="Jobs of one tenant the workers run at once; its other jobs wait `queued` while free "
        "workers take other tenants' jobs (workers pick the tenant with the fewest running jobs, then the "
        "one that started a job longest ago). 0: no cap. `kt admin set-limits` overrides it per tenant.",
    )
    max_queued_jobs_per_tenant: int = Field(
        default=20,
        ge=0,
        description="Jobs one tenant may have waiting (`queued`); a submission or retry past it answers "
        "429 with `Retry-After` and creates nothing. 0: no limit. Overridable per tenant.",
    )
    max_storage_bytes_per_tenant: int = Field(
        default=20 * 1024**3,
        ge=0,
        description="Bytes of images one tenant's datasets may hold on disk (default 20 GiB); an upload "
        "that would pass it answers 413 and keeps nothing. 0: no limit. Overridable per tenant.",
    )
    max_cache_bytes_per_tenant: int = Field(
        default=20 * 1024**3,
        ge=0,
        description="Bytes each of a tenant's content-addressed cache stores may hold (default 20 GiB): the "
        "teacher outputs and the curate embeddings its jobs share, under `<data_dir>/tenants/<tenant>/cache`. "
        "Past it, the least recently used entries that no job is building or reading are deleted. 0: no cap.",
    )
    gallery_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders on the server an admin gallery build (`POST /v1/admin/galleries`) may read "
        "`path` sources from: a JSON list, or absolute paths separated by `:`. A source must lie inside "
        "one of them once symlinks are resolved, and never inside (or around) `data_dir`, which holds "
        "every tenant's uploads. Empty (the default): server paths are refused, and galleries are built "
        "from uploaded datasets (`dataset_id`, the caller's own) only.",
    )
    webhook_http_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts a job's `webhook_url` may name with plain `http://` (a JSON list, or names "
        "separated by `,`); every other webhook must be `https://`. Empty (the default): https only.",
    )
    webhook_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Private, loopback or link-local networks a webhook may reach (CIDRs such as "
        "`10.0.0.0/8` or `127.0.0.1/32`, a JSON list or separated by `,`). Webhooks to such addresses "
        "are refused otherwise, at submit and again before each delivery (the host is resolved each "
        "time), so that a job cannot make the service call into its own network.",
    )
    webhook_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries of a webhook delivery before it is recorded as failed."
    )
    webhook_backoff_s: float = Field(
        default=2.0,
        ge=0,
        description="Wait before a webhook delivery's second try, doubling after each failed one "
        "(2, 4, 8, 16 s by default).",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds a webhook receiver has to answer one delivery."
    )
    webhook_poll_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="Seconds between two looks of an API process for finished jobs whose webhook is "
        "due (0: this process sends no webhooks; another API process must).",
    )
    api_host: str = Field(default="127.0.0.1", description="Interface the API server binds to.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port the API server listens on.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Log level of the API and the workers."
    )

    @field_validator("gallery_roots", mode="before")
    @classmethod
    def _split_gallery_roots(cls, value: Any) -> Any:
        """``KT_GALLERY_ROOTS`` as a JSON list or as ``os.pathsep``-separated paths (like ``PATH``)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part.strip()]
        return value

    @field_validator("webhook_http_hosts", "webhook_allowed_networks", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """A JSON list, or values separated by commas."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("stage_queues", mode="before")
    @classmethod
    def _parse_stage_queues(cls, value: Any) -> Any:
        """``KT_STAGE_QUEUES`` as a JSON object or ``stage=queue`` pairs; only the pipeline's stages."""
        from kt_train.config import STAGES  # torch-free, like every kt_train.config import of the service

        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = json.loads(text)
            else:
                pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
                if any(len(pair) != 2 for pair in pairs):
                    raise ValueError(
                        f"KT_STAGE_QUEUES {text!r}: give `stage=queue` pairs, e.g. `curate=cpu,distill=gpu`"
                    )
                value = {k.strip(): v.strip() for k, v in pairs}
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(STAGES))
            if unknown:
                raise ValueError(
                    f"KT_STAGE_QUEUES names no stage {unknown}; the stages are {', '.join(STAGES)}"
                )
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as err:
                raise ValueError(
                    f"KT_WEBHOOK_ALLOWED_NETWORKS entry {net!r} is not a network; give CIDRs such as "
                    "`10.0.0.0/8` or `127.0.0.1/32`."
                ) from err
        return value

    @model_validator(mode="after")
    def _derive_defaults_and_check_secret(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        self.data_dir = data_dir
        roots = []
        for root in self.gallery_roots:
            if not root.expanduser().is_absolute():
                raise ValueError(f"KT_GALLERY_ROOTS entry {str(root)!r} is relative; give absolute folders.")
            resolved = root.expanduser().resolve()
            if resolved.is_relative_to(data_dir):
                raise ValueError(
                    f"KT_GALLERY_ROOTS entry {str(root)!r} is inside KT_DATA_DIR ({data_dir}), which holds every "
                    "tenant's uploads; list folders outside it (uploaded datasets are given by `dataset_id`)."
                )
            roots.append(resolved)
        self.gallery_roots = roots
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'kt.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{data_dir / 'broker.db'}"
        if not self.result_backend:
            self.result_backend = f"db+sqlite:///{data_dir / 'results.db'}"
        if self.environment != "development" and self.secret_key.strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                f"KT_SECRET_KEY is a placeholder ({self.secret_key!r}) in environment {self.environment!r}; "
                "set it to a random value, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
            )
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once (``get_settings.cache_clear()`` re-reads them)."""
    return Settings()

"""Operator commands: create tenants and their API keys, revoke keys, set a tenant's quotas.

python -m service.admin create-key --tenant acme     # prints the key, once
python -m service.admin create-key --tenant ops --admin   # a key that may also call /v1/admin/...
python -m service.admin revoke-key 1a2b3c4d
python -m service.admin limits acme --max-queued-jobs 50 --max-storage 100GiB   # or `default`, or 0
python -m service.admin register-gallery runs/gallery [--name web]   # a `kt gallery build` output
python -m service.admin register-model proxy w.safetensors [--card w.card.json] [--tenant acme]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import quotas
from service.db.models import ApiKey, Gallery, Tenant, utcnow
from service.db.session import init_db, make_engine, make_session_factory
from service.registry import RegistrationError, input_side, register_model
from service.security import API_KEY_CACHE_TTL_S, generate_api_key
from service.settings import get_settings


def create_tenant_key(session: Session, tenant_name: str, *, admin: bool = False) -> str:
    """Create an API key for ``tenant_name`` (creating the tenant if needed); returns the plaintext key.
    ``admin``: the key may also call the ``/v1/admin`` routes (e.g. build galleries)."""
    tenant_name = tenant_name.strip()
    if not tenant_name:
        raise ValueError("tenant name is empty; pass a name such as `acme`")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    new = generate_api_key()
    session.add(ApiKey(tenant_id=tenant.id, prefix=new.prefix, key_hash=new.key_hash, is_admin=admin))
    session.commit()
    return new.key


def revoke_key(session: Session, prefix: str) -> int:
    """Revoke every active key with ``prefix``; returns how many. ``LookupError`` when none."""
    keys = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))).all()
    if not keys:
        raise LookupError(f"no active API key with prefix {prefix!r}")
    now = utcnow()
    for key in keys:
        key.revoked_at = now
    session.commit()
    return len(keys)


# what `kt admin limits` takes: a count (or bytes), `default` (the KT_MAX_*_PER_TENANT setting), 0: none
DEFAULT_LIMIT = "default"
_SIZE_UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "kb": 1000, "mb": 1000**2,
               "gb": 1000**3, "tb": 1000**4, "b": 1}  # fmt: skip
LIMIT_COLUMNS = {
    "running_jobs": "max_running_jobs",
    "queued_jobs": "max_queued_jobs",
    "storage_bytes": "max_storage_bytes",
}


def parse_limit(text: str, *, size: bool = False) -> int | None:
    """A limit as given on the command line: ``default`` -> ``None`` (the setting's), else a
    whole number >= 0 (0: no limit); with ``size``, bytes with an optional unit (``20GiB``, ``500MB``)."""
    value = text.strip().lower().replace(" ", "")
    if value == DEFAULT_LIMIT:
        return None
    factor = 1
    if size:
        unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if value.endswith(u)), None)
        if unit is not None:
            value, factor = value[: -len(unit)], _SIZE_UNITS[unit]
    try:
        number = float(value) if size else int(value)
    except ValueError:
        number = -1
    if number < 0 or number != number:  # NaN
        what = "bytes, e.g. 20GiB" if size else "a whole number"
        raise ValueError(
            f"{text!r} is not a limit: give {what}, 0 for no limit, or `default` for the setting"
        )
    return int(number * factor)


def set_tenant_limits(session: Session, tenant_name: str, **limits: int | None) -> Tenant:
    """Set the tenant's own limits (keys of ``LIMIT_COLUMNS``; ``None``: back to the setting's);
    limits not named are left as they are. ``LookupError`` for an unknown tenant."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name.strip()))
    if tenant is None:
        raise LookupError(f"no tenant named {tenant_name!r}; `kt admin create-key --tenant NAME` creates one")
    for name, value in limits.items():
        setattr(tenant, LIMIT_COLUMNS[name], value)
    session.commit()
    return tenant


def _amount(name: str, n: int) -> str:
    return quotas.human_bytes(n) if name == "storage_bytes" else str(n)


def describe_limits(session: Session, tenant: Tenant) -> str:
    """The tenant's limits in force, where each comes from, and what it uses now."""
    settings = get_settings()
    limits = quotas.tenant_limits(session, settings, tenant.id)
    used = {
        "running_jobs": quotas.count_jobs(session, tenant.id, "running"),
        "queued_jobs": quotas.count_jobs(session, tenant.id, "queued"),
        "storage_bytes": quotas.stored_bytes(session, tenant.id),
    }
    lines = [f"tenant {tenant.name}:"]
    for name in LIMIT_COLUMNS:
        limit = getattr(limits, name)
        shown = _amount(name, limit) if limit else "no limit"
        origin = "this tenant's own" if name in limits.own else quotas.SETTING[name]
        lines.append(f"  {name.replace('_', ' ')}: {_amount(name, used[name])} of {shown} ({origin})")
    return "\n".join(lines)


def read_gallery_json(path: str | Path) -> dict[str, Any]:
    """``<path>/gallery.json`` of a ``kt gallery build`` output (read with json only: no kt_train)."""
    meta_path = Path(path).expanduser().resolve() / "gallery.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; pass a directory made by `kt gallery build`")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} is not a JSON object")
    return meta


def gallery_index_kind(meta: dict[str, Any]) -> str:
    """The index type a gallery.json records: the kinds its shards' indexes were built as (what
    ``auto`` chose, e.g. ``flat`` or ``flat+hnsw``), else the requested kind, else ``none``."""
    index = meta.get("index")
    if not index:
        return "none"
    if not isinstance(index, dict):
        return str(index)
    on_disk = index.get("on_disk")
    if isinstance(on_disk, dict) and isinstance(on_disk.get("plan"), dict) and on_disk["plan"].get("kind"):
        return f"{on_disk['plan']['kind']} (on disk)"  # one IVF index over all shards, lists memory-mapped
    built = []
    for shard in index.get("shards") or []:
        kind = ((shard or {}).get("plan") or {}).get("kind") if isinstance(shard, dict) else None
        if kind and kind not in built:
            built.append(str(kind))
    return "+".join(built) or str(index.get("kind") or "none")


def register_gallery(session: Session, path: str | Path, name: str | None = None) -> Gallery:
    """Insert (or update, by name) the ``galleries`` row for the gallery built in ``path``."""
    root = Path(path).expanduser().resolve()
    meta = read_gallery_json(root)
    encoder = meta.get("encoder") or {}
    spec = encoder.get("spec") if isinstance(encoder, dict) else encoder
    if not spec:
        raise ValueError(f"{root / 'gallery.json'} names no encoder spec; it cannot be curated from")
    index_kind = gallery_index_kind(meta)
    gallery_name = (name or meta.get("name") or root.name).strip()
    if not gallery_name:
        raise ValueError("gallery name is empty; pass --name")
    row = session.scalar(select(Gallery).where(Gallery.name == gallery_name))
    if row is None:
        row = Gallery(name=gallery_name, path=str(root), encoder=str(spec), index_kind="", dim=0)
        session.add(row)
    row.path = str(root)
    row.size = int(meta.get("count") or 0)
    row.encoder = str(spec)
    row.index_kind = str(index_kind)
    row.dim = int(meta.get("dim") or 0)
    session.commit()
    return row


cli = typer.Typer(help="vfm-kt service administration.", no_args_is_help=True)


def _session() -> Session:
    url = get_settings().database_url
    init_db(url)
    return make_session_factory(make_engine(url))()


@cli.command("create-key")
def create_key_command(
    tenant: Annotated[str, typer.Option(help="Tenant name (created if new).")],
    admin: Annotated[
        bool, typer.Option("--admin", help="The key may also call /v1/admin (build galleries).")
    ] = False,
) -> None:
    """Create an API key for a tenant and print it (it is not shown again)."""
    with _session() as session:
        typer.echo(create_tenant_key(session, tenant, admin=admin))


@cli.command("revoke-key")
def revoke_key_command(
    prefix: Annotated[str, typer.Argument(help="The key's 8-char prefix (kt_<prefix>_...).")],
) -> None:
    """Revoke an API key by its prefix."""
    with _session() as session:
        try:
            count = revoke_key(session, prefix)
        except LookupError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from err
    typer.echo(
        f"revoked {count} key(s) with prefix {prefix}; the API refuses them within "
        f"{API_KEY_CACHE_TTL_S:g} s (each API process trusts a key it has seen for that long)"
    )


@cli.command("limits")
def limits_command(
    tenant: Annotated[str, typer.Argument(help="Tenant name.")],
    max_running_jobs: Annotated[
        str | None, typer.Option(help="Jobs it may run at once (0: no cap; `default`: the setting's).")
    ] = None,
    max_queued_jobs: Annotated[
        str | None, typer.Option(help="Jobs it may have waiting (0: no limit; `default`: the setting's).")
    ] = None,
    max_storage: Annotated[
        str | None,
        typer.Option(
            help="Bytes its datasets may hold, e.g. 100GiB (0: no limit; `default`: the setting's)."
        ),
    ] = None,
) -> None:
    """Show a tenant's quotas and usage; with options, set its own limits first (they override
    KT_MAX_RUNNING_JOBS_PER_TENANT, KT_MAX_QUEUED_JOBS_PER_TENANT, KT_MAX_STORAGE_BYTES_PER_TENANT)."""
    given = {"running_jobs": max_running_jobs, "queued_jobs": max_queued_jobs, "storage_bytes": max_storage}
    with _session() as session:
        try:
            changes = {
                name: parse_limit(text, size=name == "storage_bytes")
                for name, text in given.items()
                if text is not None
            }
            row = set_tenant_limits(session, tenant, **changes)
        except (LookupError, ValueError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from err
        typer.echo(describe_limits(session, row))


@cli.command("register-gallery")
def register_gallery_command(
    path: Annotated[
        Path, typer.Argument(help="Gallery directory (with gallery.json), from `kt gallery build`.")
    ],
    name: Annotated[str | None, typer.Option(help="Gallery name (default: the one in gallery.json).")] = None,
) -> None:
    """Register (or update) a gallery so that transfer sets and jobs can use it; prints its id."""
    with _session() as session:
        try:
            row = register_gallery(session, path, name)
        except (OSError, ValueError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from err
        typer.echo(f"{row.id} {row.name} ({row.size} images, {row.dim}-d, {row.encoder}, {row.index_kind})")


@cli.command("register-model")
def register_model_command(
    name: Annotated[
        str, typer.Argument(help="Name tenants use: timm:<arch>@registered:NAME ([a-z0-9][a-z0-9._-]*).")
    ],
    path: Annotated[Path, typer.Argument(help="The weights: a .safetensors file (pickles are refused).")],
    card: Annotated[
        Path | None,
        typer.Option(
            help="Model card JSON: arch (or timm_name), create_model_kwargs, mean, std, input_size, "
            "norm_eval. Default: X.card.json beside X.safetensors, if any."
        ),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option(help="Only this tenant may use it (default: every tenant).")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="timm architecture (overrides the card's).")] = None,
    norm_eval: Annotated[
        bool | None,
        typer.Option(
            "--norm-eval/--no-norm-eval",
            help="Keep batch norm in eval mode when the teacher is finetuned (default: the card's, else no).",
        ),
    ] = None,
) -> None:
    """Register teacher weights: checked (safetensors, size, shapes against the architecture), copied
    to <data_dir>/registry/NAME/, and usable in a job or gallery spec as timm:<arch>@registered:NAME."""
    settings = get_settings()
    with _session() as session:
        try:
            row = register_model(
                session,
                settings,
                name,
                path,
                card_path=card,
                tenant_name=tenant,
                arch=arch,
                norm_eval=norm_eval,
            )
        except (OSError, RegistrationError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from err
        who = f"tenant {tenant}" if tenant else "every tenant"
        side = input_side(row.card)
        typer.echo(
            f"registered {row.name}: timm:{row.arch}@registered:{row.name} ({row.bytes} bytes, "
            f"sha256 {row.sha256[:12]}, input {side or 'default'}, norm_eval {row.card.get('norm_eval')}) for {who}"
        )


if __name__ == "__main__":
    cli()

"""Operator commands: create tenants and their API keys, revoke keys.

python -m service.admin create-key --tenant acme     # prints the key, once
python -m service.admin revoke-key 1a2b3c4d
"""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Tenant, utcnow
from service.db.session import init_db, make_engine, make_session_factory
from service.security import generate_api_key
from service.settings import get_settings


def create_tenant_key(session: Session, tenant_name: str) -> str:
    """Create an API key for ``tenant_name`` (creating the tenant if needed); returns the plaintext key."""
    tenant_name = tenant_name.strip()
    if not tenant_name:
        raise ValueError("tenant name is empty; pass a name such as `acme`")
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(name=tenant_name)
        session.add(tenant)
        session.flush()
    new = generate_api_key()
    session.add(ApiKey(tenant_id=tenant.id, prefix=new.prefix, key_hash=new.key_hash))
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


cli = typer.Typer(help="vfm-kt service administration.", no_args_is_help=True)


def _session() -> Session:
    url = get_settings().database_url
    init_db(url)
    return make_session_factory(make_engine(url))()


@cli.command("create-key")
def create_key_command(tenant: Annotated[str, typer.Option(help="Tenant name (created if new).")]) -> None:
    """Create an API key for a tenant and print it (it is not shown again)."""
    with _session() as session:
        typer.echo(create_tenant_key(session, tenant))


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
    typer.echo(f"revoked {count} key(s) with prefix {prefix}")


if __name__ == "__main__":
    cli()

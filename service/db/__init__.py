"""Database layer: ORM models, engines/sessions, and Alembic-driven schema setup."""

from service.db.models import ApiKey, Base, Dataset, Gallery, Job, Model, Tenant, TransferSet
from service.db.session import get_engine, get_session, init_db, make_engine, make_session_factory

__all__ = [
    "ApiKey",
    "Base",
    "Dataset",
    "Gallery",
    "Job",
    "Model",
    "Tenant",
    "TransferSet",
    "get_engine",
    "get_session",
    "init_db",
    "make_engine",
    "make_session_factory",
]

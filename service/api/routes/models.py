"""``/v1/models``: trained student models: their cards, and their exported files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api.deps import CurrentTenant, SessionDep
from service.api.errors import NotFound
from service.db.models import Model, Tenant
from service.schemas import MAX_OFFSET, ExportFormat, ModelPublic, ModelsPublic

router = APIRouter(prefix="/models", tags=["models"])

EXPORT_FORMATS = ("safetensors", "onnx", "torchscript")


def _owned(session: Session, tenant: Tenant, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant.id:
        raise NotFound(f"Model {model_id!r} not found; `GET /v1/models` lists your models.")
    return model


def _public(model: Model) -> ModelPublic:
    formats = [fmt for fmt in EXPORT_FORMATS if (model.files or {}).get(fmt)]
    return ModelPublic(
        id=model.id, job_id=model.job_id, card=model.card or {}, formats=formats, created_at=model.created_at
    )


@router.get("", response_model=ModelsPublic)
def list_models(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> ModelsPublic:
    """The tenant's models, newest first."""
    where = Model.tenant_id == tenant.id
    count = session.scalar(select(func.count()).select_from(Model).where(where))
    rows = session.scalars(
        select(Model).where(where).order_by(Model.created_at.desc(), Model.id).limit(limit).offset(offset)
    ).all()
    return ModelsPublic(data=[_public(row) for row in rows], count=count or 0)


@router.get("/{model_id}", response_model=ModelPublic, responses={404: {}})
def get_model(model_id: str, session: SessionDep, tenant: CurrentTenant) -> ModelPublic:
    """The model card (classes, preprocessing, metrics, lineage) and the downloadable formats."""
    return _public(_owned(session, tenant, model_id))


@router.get("/{model_id}/download", response_class=FileResponse, responses={404: {}})
def download_model(
    model_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    format: Annotated[ExportFormat, Query()] = "safetensors",
) -> FileResponse:
    """One exported file of the model."""
    model = _owned(session, tenant, model_id)
    stored = (model.files or {}).get(format)
    path = Path(stored) if stored else None
    if path is None or not path.is_file():
        raise NotFound(
            f"Model {model_id!r} was not exported as {format}; its formats: {_public(model).formats}."
        )
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"model-{model_id}{path.suffix or '.' + format}"
    )

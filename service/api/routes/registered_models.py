"""``/v1/registered-models``: teacher weights an operator registered (``kt admin register-model``)
that the caller's tenant may name in a spec, ``timm:<arch>@registered:<name>``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from service.api.deps import CurrentTenant, SessionDep
from service.db.models import RegisteredModel
from service.registry import input_side, visible_to
from service.schemas import MAX_OFFSET

router = APIRouter(prefix="/registered-models", tags=["registered-models"])


class RegisteredModelPublic(BaseModel):
    id: str
    name: str
    arch: str = Field(description="The timm architecture; name the model as `timm:<arch>@registered:<name>`.")
    spec: str = Field(description="The spec that names it, e.g. `timm:mobilenetv2_100@registered:proxy`.")
    norm_eval: bool = Field(
        description="Batch norm stays in eval mode when it is finetuned (its card's default)."
    )
    input_size: int | None = Field(description="The input side it was trained at (None: the architecture's).")
    mean: list[float] | None
    std: list[float] | None
    bytes: int
    sha256: str
    shared: bool = Field(description="Every tenant may use it (else only yours).")
    created_at: datetime


class RegisteredModelsPublic(BaseModel):
    data: list[RegisteredModelPublic]
    count: int


def registered_model_public(row: RegisteredModel) -> RegisteredModelPublic:
    card = row.card or {}
    return RegisteredModelPublic(
        id=row.id,
        name=row.name,
        arch=row.arch,
        spec=f"timm:{row.arch}@registered:{row.name}",
        norm_eval=bool(card.get("norm_eval")),
        input_size=input_side(card),
        mean=card.get("mean"),
        std=card.get("std"),
        bytes=row.bytes,
        sha256=row.sha256,
        shared=row.tenant_id is None,
        created_at=row.created_at,
    )


@router.get("", response_model=RegisteredModelsPublic)
def list_registered_models(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> RegisteredModelsPublic:
    """The registered models the tenant may use as teachers or gallery encoders (its own and the
    shared ones), by name."""
    where = visible_to(tenant)
    count = session.scalar(select(func.count()).select_from(RegisteredModel).where(where))
    rows = session.scalars(
        select(RegisteredModel).where(where).order_by(RegisteredModel.name).limit(limit).offset(offset)
    ).all()
    return RegisteredModelsPublic(data=[registered_model_public(row) for row in rows], count=count or 0)

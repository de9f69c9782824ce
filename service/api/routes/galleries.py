"""``/v1/galleries``: the shared retrieval galleries transfer sets are curated from."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from service.api.deps import CurrentTenant, SessionDep
from service.db.models import Gallery
from service.schemas import MAX_OFFSET, GalleriesPublic, GalleryPublic

router = APIRouter(prefix="/galleries", tags=["galleries"])


@router.get("", response_model=GalleriesPublic)
def list_galleries(
    session: SessionDep,
    _tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> GalleriesPublic:
    """The galleries every tenant can curate from, by name."""
    count = session.scalar(select(func.count()).select_from(Gallery))
    rows = session.scalars(select(Gallery).order_by(Gallery.name).limit(limit).offset(offset)).all()
    return GalleriesPublic(data=[GalleryPublic.model_validate(row) for row in rows], count=count or 0)

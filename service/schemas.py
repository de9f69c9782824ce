"""API request/response models, one family per resource (``<Resource>Public``, ``<Resource>sPublic``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    detail: str


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    status: str
    num_images: int
    classes: list[str]
    class_counts: dict[str, int]
    bytes: int
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int

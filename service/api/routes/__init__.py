"""Routers. ``api_router`` collects the versioned ones (mounted under ``/v1``)."""

from fastapi import APIRouter

from service.api.routes import datasets

api_router = APIRouter()
api_router.include_router(datasets.router)

"""Routers. ``api_router`` collects the versioned ones (mounted under ``/v1``)."""

from fastapi import APIRouter

from service.api.routes import (
    admin,
    datasets,
    estimates,
    galleries,
    jobs,
    models,
    registered_models,
    transfer_sets,
)

api_router = APIRouter()
api_router.include_router(datasets.router)
api_router.include_router(estimates.router)  # before jobs: `/jobs/estimate` is no job id
api_router.include_router(jobs.router)
api_router.include_router(transfer_sets.router)
api_router.include_router(galleries.router)
api_router.include_router(models.router)
api_router.include_router(registered_models.router)
api_router.include_router(admin.router)

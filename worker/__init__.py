"""Celery workers: run jobs (rows of ``jobs``) through the kt_train pipeline stages."""

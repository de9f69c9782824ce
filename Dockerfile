# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t vfm-kt-api .     # the HTTP API; no torch in it
#   docker build --target worker -t vfm-kt-worker .  # a CUDA Celery worker (queues gpu, cpu)
# docker-compose.yml wires them to PostgreSQL and Redis. Both run as the non-root user `kt`
# (uid 1000) and keep artifacts in the volume /data (KT_DATA_DIR).

# ---------------------------------------------------------------------------------------------
# api: python:3.11-slim, the project installed WITHOUT its ML dependencies (--no-deps), plus the
# packages the service needs, listed here (keep in step with pyproject.toml's "service:" groups;
# pyarrow: the API rewrites server paths out of Parquet manifests, service/redact.py).
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS api
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KT_DATA_DIR=/data
RUN useradd --create-home --uid 1000 kt && mkdir -p /data && chown kt:kt /data
WORKDIR /app
RUN pip install \
      "sqlalchemy>=2" "alembic>=1.16" "pydantic>=2.7" "pydantic-settings>=2.3" "psycopg[binary]>=3.1" \
      "fastapi>=0.115" "uvicorn[standard]>=0.30" "python-multipart>=0.0.9" "prometheus-client>=0.20" \
      "jinja2>=3.1" "pyarrow>=15" \
      "celery[redis]>=5.4" "redis>=5" \
      "pillow>=10" "numpy>=1.26" "pyyaml>=6" "typer>=0.12" "rich>=13"
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY service ./service
COPY worker ./worker
COPY kt_train ./kt_train
# editable: alembic.ini and migrations/ stay beside the `service` package (service.db.session)
RUN pip install --no-deps -e . \
    && python -c "import service.app, sys; assert 'torch' not in sys.modules"
USER kt
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"
CMD ["sh", "-c", "alembic upgrade head && exec uvicorn --factory service.app:create_app --host 0.0.0.0 --port 8000 --proxy-headers"]

# ---------------------------------------------------------------------------------------------
# worker: CUDA runtime + Python 3.11 (Ubuntu 22.04's python3.11), the pinned torch build, the
# whole project; one Celery worker process (solo pool) per container / GPU.
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS worker
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    KT_DATA_DIR=/data
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && useradd --create-home --uid 1000 kt && mkdir -p /data && chown kt:kt /data
WORKDIR /app
# pinned like .ci/setup; PyPI's Linux wheels carry their CUDA libraries
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY service ./service
COPY worker ./worker
COPY kt_train ./kt_train
RUN pip install -e ".[tensorboard]" && python -c "import torch, tensorboard, worker.app"
USER kt
VOLUME ["/data"]
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
  CMD celery -A worker.app:celery_app inspect ping -d "kt-worker@$HOSTNAME" --timeout 10 || exit 1
CMD ["celery", "-A", "worker.app:celery_app", "worker", "-Q", "gpu,cpu", "--pool", "solo", "-c", "1", \
     "--loglevel", "INFO", "-n", "kt-worker@%h"]

"""Static checks of the container deployment (no Docker engine runs here): docker-compose.yml,
the Dockerfile's two targets and .dockerignore agree with each other and with ``Settings``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("api", "worker", "redis", "postgres")
REQUIRED_ENV = ("KT_DATABASE_URL", "KT_BROKER_URL", "KT_DATA_DIR", "KT_SECRET_KEY", "KT_ENVIRONMENT")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> its text (the ``FROM ... AS name`` line through the next ``FROM``)."""
    text = (REPO / "Dockerfile").read_text()
    # drop comments so prose can't satisfy (or break) the checks
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    parts = re.split(r"(?im)^(?=FROM\s)", text)
    stages = {}
    for part in parts:
        match = re.match(r"(?i)FROM\s+(\S+)\s+AS\s+(\S+)", part)
        if match:
            stages[match.group(2).lower()] = part
    return stages


def pip_installs(stage: str) -> list[str]:
    """The ``pip install ...`` commands of a stage (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", stage)
    return [cmd.strip() for cmd in re.split(r"&&|;|\n", joined) if re.search(r"\bpip\s+install\b", cmd)]


def test_compose_has_services_with_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SERVICES:
        assert name in services, name
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "data" in compose["volumes"]
    for name in ("api", "worker"):
        assert any(str(v).startswith("data:/data") for v in services[name]["volumes"]), name
        assert services[name]["build"]["target"] == name
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert "redis-cli" in str(services["redis"]["healthcheck"]["test"])


def test_api_waits_for_healthy_dependencies_and_migrates(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    for dep in ("postgres", "redis"):
        assert api["depends_on"][dep]["condition"] == "service_healthy"
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert "alembic upgrade head" in " ".join(api["command"])


def test_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == 1 and "gpu" in d["capabilities"] for d in devices)
    command = worker["command"]
    assert set(command[command.index("-Q") + 1].split(",")) == {"cpu", "gpu"}


def test_compose_env_matches_settings(compose: dict[str, Any]) -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    known = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    for name, service in compose["services"].items():
        unknown = {k for k in env_of(service) if k.startswith(prefix) and k not in known}
        assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields"
    for name in ("api", "worker"):
        env = env_of(compose["services"][name])
        missing = [k for k in REQUIRED_ENV if not env.get(k)]
        assert not missing, f"{name} lacks {missing}"
        assert env["KT_ENVIRONMENT"] == "production"
        assert env["KT_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["KT_BROKER_URL"].startswith("redis://redis:6379/")
        assert env["KT_DATA_DIR"] == "/data"
        # no default secret: compose refuses to start without one
        assert env["KT_SECRET_KEY"].startswith("${KT_SECRET_KEY:?")


def test_dockerfile_targets() -> None:
    stages = dockerfile_stages()
    assert {"api", "worker"} <= set(stages)
    api, worker = stages["api"], stages["worker"]
    assert re.match(r"(?i)FROM\s+python:3\.11-slim\s", api)
    assert re.match(r"(?i)FROM\s+nvidia/cuda:\S+-runtime\S*\s", worker)
    api_pips, worker_pips = pip_installs(api), pip_installs(worker)
    assert api_pips and not any("torch" in cmd.lower() for cmd in api_pips), (
        "the api image must not install torch"
    )
    # the project itself without its dependencies (they include torch)
    assert any(re.search(r"--no-deps\s+(-e\s+)?\.(\s|$)", cmd) for cmd in api_pips), api_pips
    assert any("torch==2.14.1" in cmd and "torchvision==0.29.1" in cmd for cmd in worker_pips), worker_pips
    for stage in (api, worker):
        assert re.search(r"(?m)^USER\s+(?!root\b|0\b)\S+", stage), "runs as root"
        assert "KT_DATA_DIR=/data" in stage
        assert re.search(r'(?m)^VOLUME\s+\[?"?/data', stage)
        assert re.search(r"(?m)^HEALTHCHECK\s", stage)
    assert "/healthz" in api and "alembic upgrade head" in api
    assert "service.app:create_app" in api and "--factory" in api
    assert re.search(r'"-Q",\s*"gpu,cpu"', worker)


def test_dockerfile_copies_what_the_images_need() -> None:
    """Every path COPY'd exists, and .dockerignore doesn't exclude it."""
    text = (REPO / "Dockerfile").read_text()
    for line in re.findall(r"(?m)^COPY\s+(.+)$", text):
        for src in line.split()[:-1]:
            if not src.startswith("--"):
                assert (REPO / src).exists(), src


def test_dockerignore_excludes_local_state() -> None:
    lines = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", "bench/work", "kt-data", "runs", ".git", ".env"):
        assert entry in lines, entry
    for needed in (
        "service",
        "worker",
        "kt_train",
        "migrations",
        "alembic.ini",
        "pyproject.toml",
        "README.md",
    ):
        assert needed not in lines, needed


def test_the_package_takes_a_torch_range_and_the_setup_pins_the_build() -> None:
    """`pip install vfm-kt` must fit the torch a user already has (issue 13 §8): the package
    requires a range; only the development/CI set-up and the worker image pin the exact build."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name in ("torch", "torchvision"):
        (req,) = [d for d in deps if re.match(rf"{name}\s*[<>=!~]", d)]
        assert "==" not in req and ">=" in req, f"{req!r}: the package must take a range of {name}"
    setup = (REPO / ".ci/setup").read_text()
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup


def test_the_worker_image_installs_the_tensorboard_extra() -> None:
    """Training curves go to TensorBoard beside history.json only where the package is installed
    (kt_train/tensorboard.py): the worker image installs the extra and checks the import."""
    worker = (REPO / "Dockerfile").read_text().split("AS worker", 1)[1]
    assert re.search(r"pip install -e \"\.\[[^\]]*tensorboard[^\]]*\]\"", worker)
    assert "import torch, tensorboard" in worker

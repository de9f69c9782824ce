"""Shared fixtures: a tiny synthetic dataset and a small, fast training config.

Everything runs offline on CPU with random-init tiny timm models (no weights are downloaded):
the teacher is ``timm:test_vit`` (a ViT, layer-decay capable), the student ``timm:test_efficientnet``
(a conv net with batch norm). Images are 32 px and every phase runs a handful of steps.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TEACHER = "timm:test_vit"
STUDENT = "timm:test_efficientnet"
BN_TEACHER = "timm:test_efficientnet"  # a teacher with batch norm, for norm_eval

# Demo data sizes: 4 classes.
PER_CLASS = 6
TEST_PER_CLASS = 5
UNLABELED = 48
NUM_CLASSES = 4

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def all_config_keys(model: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the training config, found by walking the pydantic models directly
    (independently of ``describe_keys``, which the tests check against this)."""
    from kt_train.config import TrainConfig, _submodel

    model = TrainConfig if model is None else model
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _submodel(field)
        if sub is not None:
            keys.extend(all_config_keys(sub, f"{prefix}{name}."))
    return keys


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: the models and batches here are tiny, so threads only add overhead, and
    on a loaded 2-core machine an OpenMP barrier waiting on a preempted thread makes steps 20x slower.
    Set KT_TEST_THREADS to change it."""
    import torch

    torch.set_num_threads(int(os.environ.get("KT_TEST_THREADS", "1")))


def small_config_dict(data: dict[str, Path], out_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """A complete config for the demo data that runs every stage in seconds on CPU.

    ``overrides`` are dotted keys with ``__`` for dots (``distill__steps=3``) or plain top-level keys.
    """
    opt = {"steps": 4, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01}
    cfg: dict[str, Any] = {
        "seed": 0,
        "device": "cpu",
        "out_dir": str(out_dir),
        "teacher": {"model": TEACHER, "image_size": 32},
        "student": {"model": STUDENT, "image_size": 32},
        "data": {
            "train": {"path": str(data["train"])},
            "test": {"path": str(data["test"])},
            "transfer": {"path": str(data["transfer"])},
        },
        "finetune_teacher": {
            "linear_probe": {**opt, "lr": 1e-2, "weight_decay": 0.0},
            "full_finetune": {**opt, "steps": 0},
        },
        "distill": {**opt, "steps": 5},
        "finetune_student": dict(opt),
        "export": {"formats": ["safetensors", "onnx"]},
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(value)
    return cfg


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/ (4 classes x 6), test/ (4 x 5) and an unlabeled transfer/ (48) folder of 32 px images.

    Shared by the whole session: never write into it (copy it first, see ``copy_demo_split``).
    """
    from kt_train.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo_data")
    return make_demo_data(
        root, per_class=PER_CLASS, test_per_class=TEST_PER_CLASS, unlabeled=UNLABELED, size=32
    )


@pytest.fixture
def small_config(demo_data: dict[str, Path], tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Factory: ``small_config(out_dir=None, **overrides)`` -> a config dict (see ``small_config_dict``)."""

    def make(out_dir: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
        return small_config_dict(demo_data, out_dir if out_dir is not None else tmp_path / "run", **overrides)

    return make


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes: offline, few threads, the repo importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=os.environ.get("KT_TEST_THREADS", "1"),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        COLUMNS="200",
    )
    return env

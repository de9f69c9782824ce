"""``kt_train.weights.check_weights``: a safetensors file against a timm architecture, from the
header only; the classifier (``pretrained_cfg["classifier"]``) may differ, nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from kt_train.weights import check_weights, classifier_prefixes


def save(path: Path, arch: str, **kwargs: object) -> Path:
    save_file(timm.create_model(arch, **kwargs).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tmp_path_factory.mktemp("w") / "r10.safetensors", "resnet10t", num_classes=3)


def test_weights_that_fit(tiny: Path) -> None:
    assert check_weights("resnet10t", {"num_classes": 3}, tiny) == []
    # another number of classes: only the classifier differs, which a teacher replaces anyway
    assert check_weights("resnet10t", {}, tiny) == []
    assert check_weights("resnet10t", {"num_classes": 0}, tiny) == []


def test_weights_of_another_model(tmp_path: Path, tiny: Path) -> None:
    problems = check_weights("resnet14t", {}, tiny)
    assert any("missing from the file" in p for p in problems)
    r18 = save(tmp_path / "r18.safetensors", "resnet18")
    problems = check_weights("resnet10t", {}, r18)
    assert any("another shape" in p and "downsample" in p for p in problems), problems
    assert "the classifier fc may differ" in problems[-1]


def test_bad_arguments_are_problems_not_crashes(tmp_path: Path, tiny: Path) -> None:
    assert "timm has no architecture" in check_weights("resnet_10t", {}, tiny)[0]
    assert "fix create_model_kwargs" in check_weights("resnet10t", {"no_such_kwarg": 1}, tiny)[0]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    assert "not a readable safetensors file" in check_weights("resnet10t", {}, junk)[0]


def test_classifier_prefixes() -> None:
    assert classifier_prefixes(timm.create_model("resnet10t")) == ("fc.",)
    assert classifier_prefixes(timm.create_model("test_vit")) == ("head.",)


def test_command_line(tiny: Path) -> None:
    run = [
        sys.executable,
        "-m",
        "kt_train.weights",
        "resnet18",
        str(tiny),
        "--kwargs",
        json.dumps({}),
        "--json",
    ]
    result = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and json.loads(result.stdout)["problems"], result.stderr

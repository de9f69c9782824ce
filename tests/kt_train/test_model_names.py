"""``service/model_names.json`` (what the API checks model specs against) matches the installed
timm and open_clip: regenerate it with ``python -m kt_train.model_names > service/model_names.json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import timm

from kt_train.model_names import GENERATOR

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "service" / "model_names.json"


def test_committed_names_are_from_the_installed_versions() -> None:
    versions = json.loads(COMMITTED.read_text())["versions"]
    installed = {"timm": timm.__version__, "open_clip": open_clip.__version__}
    assert versions == installed, (
        f"service/model_names.json is stale ({versions} != {installed}); run `{GENERATOR}`"
    )


def test_committed_names_are_what_the_generator_writes() -> None:
    # a fresh process: tests elsewhere add tiny open_clip configs to this one's registry
    fresh = subprocess.run(
        [sys.executable, "-m", "kt_train.model_names"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=300,
    ).stdout
    assert fresh == COMMITTED.read_text(), f"service/model_names.json is stale; run `{GENERATOR}`"
    names = json.loads(fresh)
    assert "resnet18" in names["timm"]["models"] and "a1_in1k" in names["timm"]["pretrained"]["resnet18"]
    assert "openai" in names["open_clip"]["pretrained"]["ViT-B-32"]

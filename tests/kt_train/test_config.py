"""The training config: strict validation with helpful messages, overrides, the key reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kt_train.config import (
    STAGES,
    DatasetRef,
    TrainConfig,
    describe_keys,
    dump_config,
    load_config,
    parse_config,
)
from kt_train.errors import ConfigError

from ..conftest import all_config_keys


def _write(tmp_path: Path, data: Any, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_defaults_are_valid() -> None:
    cfg = parse_config({})
    assert cfg == TrainConfig()
    assert cfg.stages == list(STAGES)
    assert cfg.distill.steps == 200 and cfg.distill.lr == 2e-3
    assert cfg.finetune_teacher.linear_probe.lr == 1e-2
    assert cfg.finetune_teacher.full_finetune.steps == 0


def test_small_config_fixture_is_valid(small_config) -> None:
    cfg = parse_config(small_config())
    assert cfg.device == "cpu"
    assert cfg.data.train is not None and Path(cfg.data.train.path).is_dir()


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"distil": {"steps": 3}}, "distil", "distill"),
        ({"distill": {"step": 3}}, "distill.step", "distill.steps"),
        (
            {"finetune_teacher": {"linear_probe": {"batchsize": 8}}},
            "finetune_teacher.linear_probe.batchsize",
            "finetune_teacher.linear_probe.batch_size",
        ),
        ({"data": {"train": {"path": "x", "max_item": 3}}}, "data.train.max_item", "data.train.max_items"),
        ({"teacher": {"modle": "timm:x"}}, "teacher.modle", "teacher.model"),
    ],
)
def test_unknown_key_names_key_and_suggests(data: dict, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, "my.yaml")
    msg = str(ei.value)
    assert f"unknown key '{key}'" in msg
    assert f"did you mean '{suggestion}'?" in msg
    assert "my.yaml" in msg
    assert "kt train --help" in msg


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"zzzzqqq": 1})
    assert "unknown key 'zzzzqqq'" in str(ei.value)
    assert "did you mean" not in str(ei.value)


def test_every_error_is_listed() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"distil": 1, "seed": "abc", "distill": {"lr": -1}})
    msg = str(ei.value)
    assert "'distil'" in msg and "'seed'" in msg and "'distill.lr'" in msg


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"seed": "abc"}, "seed"),
        ({"distill": {"steps": -1}}, "distill.steps"),
        ({"distill": {"steps": "many"}}, "distill.steps"),
        ({"distill": {"lr": 0}}, "distill.lr"),
        ({"distill": {"temperature": 0}}, "distill.temperature"),
        ({"distill": {"method": "magic"}}, "distill.method"),
        ({"distill": {"feature_loss": "l2"}}, "distill.feature_loss"),
        ({"finetune_student": {"batch_size": 0}}, "finetune_student.batch_size"),
        ({"finetune_student": {"label_smoothing": 1.0}}, "finetune_student.label_smoothing"),
        ({"finetune_student": {"augment": {"scale_min": 0}}}, "finetune_student.augment.scale_min"),
        ({"finetune_teacher": {"layer_decay": 1.5}}, "finetune_teacher.layer_decay"),
        ({"teacher": {"head": "deep"}}, "teacher.head"),
        ({"teacher": {"image_size": 4}}, "teacher.image_size"),
        ({"stages": ["distill", "train"]}, "stages.1"),
        ({"export": {"formats": ["pdf"]}}, "export.formats.0"),
        ({"export": {"opset": 9}}, "export.opset"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"data": {"train": {}}}, "data.train.path"),
        ({"data": {"num_workers": -1}}, "data.num_workers"),
    ],
)
def test_bad_value_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert f"'{key}':" in str(ei.value)


def test_bad_value_message_shows_the_input() -> None:
    with pytest.raises(ConfigError, match=r"'distill\.steps'.*got -5"):
        parse_config({"distill": {"steps": -5}})


def test_load_config_with_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {"distill": {"steps": 50, "lr": 0.01}, "out_dir": "runs/a"})
    cfg = load_config(
        path,
        [
            "distill.steps=3",
            "out_dir=runs/b",
            "stages=[distill, export]",
            "data.transfer.path=/data/t",
            "teacher.model_kwargs={drop_rate: 0.1}",
        ],
    )
    assert cfg.distill.steps == 3  # override wins
    assert cfg.distill.lr == 0.01  # the file's other keys stay
    assert cfg.out_dir == "runs/b"
    assert cfg.stages == ["distill", "export"]
    assert cfg.data.transfer == DatasetRef(path="/data/t")
    assert cfg.teacher.model_kwargs == {"drop_rate": 0.1}


def test_overrides_without_a_file() -> None:
    cfg = load_config(None, ["seed=7", "export.formats=[onnx]"])
    assert cfg.seed == 7 and cfg.export.formats == ["onnx"]


def test_override_values_are_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["finetune_teacher.layer_decay=0.75", "data.cache_images=false", "teacher.image_size=null"]
    )
    assert cfg.finetune_teacher.layer_decay == 0.75
    assert cfg.data.cache_images is False
    assert cfg.teacher.image_size is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (["distill.steps"], "must look like key.sub=value"),
        (["distil.steps=3"], "unknown key 'distil'"),
        (["distill.steps=abc"], "'distill.steps'"),
        (["seed=1", "seed.x=1"], "'seed' is not a section"),
        (["seed.x=1"], "'seed'"),
    ],
)
def test_bad_overrides(override: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, override)
    assert fragment in str(ei.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "distill: [1, 2\n  steps: :"))


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == TrainConfig()


def test_dump_round_trip(tmp_path: Path, small_config) -> None:
    cfg = parse_config(small_config(distill__method="task_agnostic", finetune_teacher__layer_decay=0.7))
    text = dump_config(cfg)
    again = load_config(_write(tmp_path, text))
    assert again == cfg


def test_assignment_is_validated() -> None:
    cfg = TrainConfig()
    with pytest.raises(ValueError):
        cfg.distill.steps = -1


def test_describe_keys_covers_every_field() -> None:
    rows = describe_keys()
    described = [k for k, _, _ in rows]
    expected = all_config_keys()
    assert len(expected) > 60  # the walk really recursed (into data.train.path and the like)
    missing = sorted(set(expected) - set(described))
    assert not missing
    assert len(described) == len(set(described))  # each key once
    for key in (
        "data.train.path",
        "finetune_teacher.linear_probe.augment.scale_min",
        "distill.feature_source",
        "distill.augment.hflip",
        "export.opset",
        "teacher.norm_eval",
    ):
        assert key in described


def test_describe_keys_documents_defaults_and_descriptions() -> None:
    rows = {k: (d, desc) for k, d, desc in describe_keys()}
    assert rows["distill.steps"][0] == "200"  # the section's own default, not OptimConfig's
    assert rows["finetune_teacher.linear_probe.lr"][0] == "0.01"
    assert rows["data.train.path"][0] == "(required)"
    assert rows["teacher.model"][0] == "timm:test_vit"
    undocumented = [k for k, (_, desc) in rows.items() if not desc and k.count(".") > 0]
    assert not undocumented

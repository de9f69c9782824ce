"""The ``kt`` command line: help, an end-to-end run, and clear errors with exit code 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner, Result

from kt_train import cli
from kt_train.config import TrainConfig, describe_keys, dump_config, load_config

from ..conftest import VENV_BIN, all_config_keys


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # A wide console, so that messages are not wrapped in the middle of what the tests look for.
    monkeypatch.setattr(cli, "console", Console(stderr=True, width=400))
    return CliRunner()


def _write_cfg(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _flat(text: str) -> str:
    return " ".join(text.split())


def assert_user_error(result: Result, *fragments: str) -> None:
    """Exit code 2, the message on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    err = _flat(result.stderr)
    assert err.startswith("error:"), err
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"


# --------------------------------------------------------------------------- help and config


def test_train_help_lists_every_config_key(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    listed = set()
    for line in result.output.splitlines():
        m = re.match(r"^\s+([a-z_][a-z0-9_.]*)(?: = .*)?$", line)
        if m:
            listed.add(m.group(1))
    keys = all_config_keys()
    missing = [k for k in keys if k not in listed]
    assert not missing
    # ... with their defaults and descriptions
    assert "distill.steps = 200" in result.output
    for _, _, desc in describe_keys():
        if desc:
            assert desc in result.output


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, [])
    assert "train" in result.output and "config" in result.output


def test_config_prints_yaml_that_load_config_accepts(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["config"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "printed.yaml"
    path.write_text(result.stdout)
    assert load_config(path) == TrainConfig()
    assert result.stdout == dump_config(TrainConfig())


def test_config_resolves_a_file_with_overrides(runner: CliRunner, tmp_path: Path, small_config) -> None:
    src = _write_cfg(tmp_path / "cfg.yaml", small_config())
    result = runner.invoke(cli.app, ["config", "-c", str(src), "--set", "distill.steps=3", "-s", "seed=5"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.stdout)
    assert data["distill"]["steps"] == 3 and data["seed"] == 5
    assert data["data"]["train"]["path"] == small_config()["data"]["train"]["path"]
    path = tmp_path / "printed.yaml"
    path.write_text(result.stdout)
    assert load_config(path) == load_config(src, ["distill.steps=3", "seed=5"])


def test_config_rejects_an_unknown_key(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["config", "--set", "distil.steps=3"])
    assert_user_error(result, "unknown key 'distil'", "did you mean 'distill'?")
    assert result.stdout == ""


# --------------------------------------------------------------------------- train: errors


def test_unknown_key_in_the_file(runner: CliRunner, tmp_path: Path, small_config) -> None:
    cfg = small_config()
    cfg["finetune_teacher"]["linear_probe"]["stepz"] = 3
    path = _write_cfg(tmp_path / "cfg.yaml", cfg)
    result = runner.invoke(cli.app, ["train", "-c", str(path)])
    assert_user_error(
        result,
        "unknown key 'finetune_teacher.linear_probe.stepz'",
        "did you mean 'finetune_teacher.linear_probe.steps'?",
        str(path),
    )
    assert not (tmp_path / "run").exists()  # nothing ran


def test_unknown_key_in_set(runner: CliRunner, tmp_path: Path, small_config) -> None:
    path = _write_cfg(tmp_path / "cfg.yaml", small_config())
    result = runner.invoke(cli.app, ["train", "-c", str(path), "--set", "distill.temprature=2"])
    assert_user_error(result, "unknown key 'distill.temprature'", "did you mean 'distill.temperature'?")


def test_bad_value(runner: CliRunner, tmp_path: Path, small_config) -> None:
    path = _write_cfg(tmp_path / "cfg.yaml", small_config())
    result = runner.invoke(cli.app, ["train", "-c", str(path), "--set", "distill.steps=-3"])
    assert_user_error(result, "'distill.steps'", "got -3")


def test_missing_config_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["train", "-c", str(tmp_path / "nope.yaml")])
    assert_user_error(result, f"config file {tmp_path / 'nope.yaml'} does not exist")


def test_missing_data_path(runner: CliRunner, tmp_path: Path, small_config) -> None:
    missing = tmp_path / "no_such_images"
    path = _write_cfg(tmp_path / "cfg.yaml", small_config(data__train={"path": str(missing)}))
    result = runner.invoke(cli.app, ["train", "-c", str(path)])
    assert_user_error(result, f"dataset path {missing} does not exist")
    assert not (tmp_path / "run" / "finetune_teacher" / "_SUCCESS").exists()


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        ("timm:resnet181", ["timm has no model named 'resnet181'", "did you mean", "resnet18"]),
        # The message quotes 'timm:<name>[@tag|path]': it must print as text, not as console markup.
        ("resnet18", ["has no library prefix", "'timm:<name>[@tag|path]'", "'open_clip:<arch>[@tag|path]'"]),
        ("open_clip:ViT-B-33", ["open_clip has no architecture named 'ViT-B-33'", "ViT-B-32"]),
    ],
)
def test_unknown_model(
    runner: CliRunner, tmp_path: Path, small_config, model: str, fragments: list[str]
) -> None:
    path = _write_cfg(tmp_path / "cfg.yaml", small_config(teacher__model=model))
    result = runner.invoke(cli.app, ["train", "-c", str(path)])
    assert_user_error(result, *fragments)


def test_class_without_images(
    runner: CliRunner, tmp_path: Path, small_config, demo_data: dict[str, Path]
) -> None:
    train = tmp_path / "train"
    shutil.copytree(demo_data["train"], train)
    (train / "empty_class").mkdir()
    path = _write_cfg(tmp_path / "cfg.yaml", small_config(data__train={"path": str(train)}))
    result = runner.invoke(cli.app, ["train", "-c", str(path)])
    assert_user_error(result, "class 'empty_class' has no images", "add images or remove the folder")


def test_unknown_stage_option(runner: CliRunner, tmp_path: Path, small_config) -> None:
    path = _write_cfg(tmp_path / "cfg.yaml", small_config())
    result = runner.invoke(cli.app, ["train", "-c", str(path), "--stages", "finetune_teacher,distil"])
    assert_user_error(result, "'stages.1'")


# --------------------------------------------------------------------------- train: runs


def test_train_options_select_stages_and_out_dir(runner: CliRunner, tmp_path: Path, small_config) -> None:
    path = _write_cfg(tmp_path / "cfg.yaml", small_config(tmp_path / "ignored"))
    out = tmp_path / "chosen"
    result = runner.invoke(
        cli.app,
        [
            "train",
            "-c",
            str(path),
            "-o",
            str(out),
            "--stages",
            "finetune_teacher",
            "--set",
            "finetune_teacher.linear_probe.steps=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "ignored").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["finetune_teacher"]
    resolved = load_config(out / "config.yaml")
    assert resolved.out_dir == str(out)
    assert resolved.stages == ["finetune_teacher"]
    assert resolved.finetune_teacher.linear_probe.steps == 2
    history = json.loads((out / "finetune_teacher" / "history.json").read_text())
    assert history["linear_probe"][-1]["step"] == 2
    assert "finetune_teacher" in result.stderr


def test_failed_export_format_is_reported_and_exported_again_alone(
    runner: CliRunner, tmp_path: Path, small_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX failing its check leaves the run with the safetensors model, the test metrics in the
    card and a hint; ``kt train --stages export --set export.formats=[onnx]`` then adds ONNX."""
    from kt_train import export as E

    out = tmp_path / "run"
    cfg = small_config(out, finetune_student__steps=2)
    path = _write_cfg(tmp_path / "cfg.yaml", cfg)
    real = E._run_onnx
    with monkeypatch.context() as m:
        m.setattr(E, "_run_onnx", lambda p, xs: ([g.flip(-1) * 10 for g in real(p, xs)[0]], None))
        result = runner.invoke(
            cli.app, ["train", "-c", str(path), "--stages", "finetune_student,export,evaluate"]
        )
    assert result.exit_code == 0, result.output
    err = _flat(result.stderr)
    assert "onnx left out" in err and "argmax disagrees" in err
    assert "kt train --stages export --set export.formats=[onnx]" in err
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert card["files"] == {"safetensors": "model.safetensors"} and set(card["failed_formats"]) == {"onnx"}
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert card["metrics"]["test"]["top1"] == metrics["student"]["top1"]

    result = runner.invoke(
        cli.app, ["train", "-c", str(path), "--stages", "export", "--set", "export.formats=[onnx]"]
    )
    assert result.exit_code == 0, result.output
    assert "left out" not in result.stderr
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert set(card["files"]) == {"safetensors", "onnx"} and card["failed_formats"] == {}
    assert card["metrics"]["test"]["top1"] == metrics["student"]["top1"]
    assert card["lineage"]["method"] == "scratch"  # the student trained by the first run
    assert (out / "export" / "model.onnx").is_file()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_kt_train_end_to_end_subprocess(tmp_path: Path, small_config, subprocess_env: dict[str, str]) -> None:
    """The installed ``kt`` entry point runs every stage on tiny models and reports a summary."""
    kt = VENV_BIN / "kt"
    assert kt.exists(), f"{kt} missing: install the package (pip install -e .)"
    out = tmp_path / "run"
    cfg = small_config(out, finetune_teacher__full_finetune__steps=2, finetune_student__steps=3)
    path = _write_cfg(tmp_path / "cfg.yaml", cfg)
    proc = subprocess.run(
        [str(kt), "train", "-c", str(path)],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    err = proc.stderr
    assert "Traceback" not in err
    # the summary table: one row per stage, with the evaluate results and the exported files
    assert "kt train" in err
    for stage in ("finetune_teacher", "distill", "finetune_student", "export", "evaluate"):
        assert re.search(rf"^\W*{stage}\b", err, re.M), stage
    assert "student top-1" in err and "teacher top-1" in err
    assert "onnx:" in err
    assert f"resolved config: {out / 'config.yaml'}" in _flat(err)
    # the resolved config is the config file with every default filled in
    assert load_config(out / "config.yaml") == load_config(path)
    assert (out / "config.yaml").read_text() == dump_config(load_config(path))
    assert (out / "export" / "model.onnx").is_file()
    assert (out / "export" / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == [  # in the order they ran: evaluate before export
        "finetune_teacher",
        "curate",
        "distill",
        "finetune_student",
        "evaluate",
        "export",
    ]
    assert "curate.gallery is not set" in summary["curate"]["skipped"]  # no gallery: data.transfer is used
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["student"]["n"] == sum(1 for _ in Path(cfg["data"]["test"]["path"]).rglob("*.png"))
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert card["lineage"]["distilled_checkpoint"] == str(out / "distill" / "student.pt")
    for stage in summary:
        assert (out / stage / "_SUCCESS").is_file() == (stage != "curate")

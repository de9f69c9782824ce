"""TensorBoard curves: each training loop writes its history rows to an event file in the stage
directory, and reading them back with TensorBoard's own reader gives exactly ``history.json``
(also across a resume, and not at all with ``KT_TENSORBOARD=0``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kt_train import pipeline
from kt_train.config import parse_config
from kt_train.tensorboard import read_scalars
from kt_train.train import train_loop
from tests.conftest import small_config_dict

pytest.importorskip("tensorboard")  # a dev dependency; without it the loops write history.json only


def assert_matches(log_dir: Path, history: list[dict[str, Any]]) -> None:
    scalars = read_scalars(log_dir)
    keys = {k for row in history for k in row if k != "step"}
    assert set(scalars) == keys, (set(scalars), keys)
    for key in keys:
        expected = [(int(row["step"]), float(row[key])) for row in history if key in row]
        got = scalars[key]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key


def test_a_stage_writes_its_loops_curves_beside_history_json(
    demo_data: dict[str, Path], tmp_path: Path
) -> None:
    cfg = parse_config(
        small_config_dict(
            demo_data,
            tmp_path,
            finetune_teacher__linear_probe__steps=12,
            finetune_teacher__full_finetune__steps=10,
        )
    )
    out = tmp_path / "finetune_teacher"
    pipeline.finetune_teacher(cfg, {}, out)
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"linear_probe", "full_finetune"}
    runs = {"linear_probe": "teacher_linear_probe", "full_finetune": "teacher_finetune"}
    assert {p.name for p in (out / "tensorboard").iterdir()} == set(runs.values())
    for loop, run in runs.items():
        assert [row["step"] for row in history[loop]] == [10, 12] if loop == "linear_probe" else [10]
        assert {"loss", "lr"} <= set(history[loop][0])
        assert_matches(out / "tensorboard" / run, history[loop])


class _Interrupt(Exception):
    pass


def _loop(ckpt: Path, fail_at: int | None = None) -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = [(torch.randn(4), int(i % 2)) for i in range(13)]
    count = {"n": 0}

    def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        count["n"] += 1
        if fail_at is not None and count["n"] == fail_at:
            raise _Interrupt
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}

    return train_loop(
        task="toy loop",
        modules={"m": model},
        groups=[{"params": list(model.parameters())}],
        step_fn=step,
        dataset=data,  # type: ignore[arg-type]
        batch_size=4,
        steps=17,
        lr=0.05,
        warmup_steps=3,
        seed=1,
        ckpt_path=ckpt,
        checkpoint_every=5,
        log_every=2,
    )


def test_a_resumed_loop_keeps_one_curve_matching_its_history(tmp_path: Path) -> None:
    with pytest.raises(_Interrupt):
        _loop(tmp_path / "last.ckpt", fail_at=13)  # rows up to step 12 written, last.ckpt at step 10
    result = _loop(tmp_path / "last.ckpt")
    assert result.resumed_from == 10
    assert [row["step"] for row in result.history] == [*range(2, 17, 2), 17]
    assert_matches(
        tmp_path / "tensorboard" / "toy_loop", result.history
    )  # not the first run's steps 11-12
    assert "acc" in read_scalars(tmp_path / "tensorboard" / "toy_loop")


def test_kt_tensorboard_0_writes_no_curves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_TENSORBOARD", "0")
    _loop(tmp_path / "last.ckpt")
    assert not (tmp_path / "tensorboard").exists()

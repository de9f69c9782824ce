"""Weight averaging (``ema_decay``): off changes nothing, on ends a phase with the hand-computed
exponential moving average of its weights, and a resumed phase ends with the same average."""

from __future__ import annotations

import re
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from kt_train import pipeline
from kt_train.config import OptimConfig, load_config, parse_config
from kt_train.errors import ConfigError
from kt_train.train import train_loop

from ..conftest import BN_TEACHER, STUDENT, small_config_dict

OPTIM_SECTIONS = (
    "finetune_teacher.linear_probe",
    "finetune_teacher.full_finetune",
    "distill",
    "finetune_student",
)

# --------------------------------------------------------------------------- the config


def test_off_by_default_in_every_optimizer_section() -> None:
    cfg = load_config(None)
    for section in OPTIM_SECTIONS:
        opt = attrgetter(section)(cfg)
        assert opt.ema_decay is None and opt.ema_start == 0, section


@pytest.mark.parametrize("section", OPTIM_SECTIONS)
def test_set_keys_reach_every_optimizer_section(section: str) -> None:
    cfg = load_config(None, [f"{section}.steps=150", f"{section}.ema_decay=0.99", f"{section}.ema_start=50"])
    opt = attrgetter(section)(cfg)
    assert (opt.ema_decay, opt.ema_start) == (0.99, 50)


@pytest.mark.parametrize("decay", [1, 1.5, -0.1, "fast"])
def test_ema_decay_out_of_range_is_a_clear_error(decay: Any) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"finetune_teacher.full_finetune.ema_decay={decay}"])
    assert "'finetune_teacher.full_finetune.ema_decay'" in str(e.value)


def test_ema_start_must_be_below_steps() -> None:
    with pytest.raises(ConfigError, match=re.escape("ema_start (150) must be below steps (150)")):
        load_config(None, ["distill.steps=150", "distill.ema_decay=0.99", "distill.ema_start=150"])
    with pytest.raises(ConfigError, match=re.escape("'distill.ema_start'")):
        load_config(None, ["distill.ema_start=-1"])
    # a skipped phase (steps 0) and averaging off do not care
    OptimConfig(steps=0, ema_decay=0.99, ema_start=10)
    OptimConfig(steps=5, ema_decay=None, ema_start=10)
    OptimConfig(steps=5, ema_decay=0.0, ema_start=10)


# --------------------------------------------------------------------------- the loop


class _Data(Dataset):
    def __init__(self, n: int = 13) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class _Interrupt(Exception):
    pass


def _model() -> nn.Module:
    """Linear -> BatchNorm (in train mode: its running statistics move) -> Linear, the first layer
    frozen (not in the optimizer: the average leaves it alone)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    return model


def _run(
    ckpt: Path,
    *,
    steps: int = 12,
    ema_decay: float | None = None,
    ema_start: int = 0,
    fail_at: int | None = None,
    before_step: list[dict[str, torch.Tensor]] | None = None,
) -> nn.Module:
    model = _model()
    calls = {"n": 0}

    def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise _Interrupt
        if before_step is not None:  # the weights after the previous step
            before_step.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        x, y = batch
        return nn.functional.cross_entropy(model(x), y), {}

    train_loop(
        task="t",
        modules={"m": model},
        groups=[{"params": [p for p in model.parameters() if p.requires_grad]}],
        step_fn=step,
        dataset=_Data(),
        batch_size=4,
        steps=steps,
        lr=0.05,
        warmup_steps=2,
        seed=1,
        ckpt_path=ckpt,
        checkpoint_every=5,
        ema_decay=ema_decay,
        ema_start=ema_start,
    )
    return model


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_off_ends_with_the_last_steps_weights(tmp_path: Path) -> None:
    off = _run(tmp_path / "none.ckpt", ema_decay=None).state_dict()
    ckpt = torch.load(tmp_path / "none.ckpt", weights_only=False)
    assert "ema" not in ckpt
    assert _equal(off, ckpt["modules"]["m"])  # the weights of step 12, as the loop has always ended
    assert _equal(_run(tmp_path / "zero.ckpt", ema_decay=0.0).state_dict(), off)  # 0 is off too
    assert "ema" not in torch.load(tmp_path / "zero.ckpt", weights_only=False)


@pytest.mark.parametrize("ema_start", [0, 4])
def test_on_ends_with_the_hand_computed_average(tmp_path: Path, ema_start: int) -> None:
    decay, steps = 0.8, 12
    snapshots: list[dict[str, torch.Tensor]] = []
    model = _run(
        tmp_path / "a.ckpt", steps=steps, ema_decay=decay, ema_start=ema_start, before_step=snapshots
    )
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    last = ckpt["modules"]["m"]  # last.ckpt keeps the last step's weights beside the average
    weights = [*snapshots, last]  # weights after step 0 (the start), 1, ..., 12
    assert len(weights) == steps + 1

    expected = {k: v.double() for k, v in weights[ema_start].items()}
    for w in weights[ema_start + 1 :]:
        expected = {k: decay * expected[k] + (1 - decay) * w[k].double() for k in expected}
    got = model.state_dict()
    averaged = ["1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias"]
    for k in averaged:
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.allclose(got[k], last[k]), k  # not the last step's weights
        torch.testing.assert_close(ckpt["ema"]["average"][f"m.{k}"], got[k], rtol=0, atol=0)
    # frozen parameters and integer buffers are the live ones
    assert torch.equal(got["0.weight"], weights[0]["0.weight"]) and torch.equal(
        got["0.weight"], last["0.weight"]
    )
    assert int(got["1.num_batches_tracked"]) == int(last["1.num_batches_tracked"]) == steps
    assert set(ckpt["ema"]["average"]) == {f"m.{k}" for k in averaged}


@pytest.mark.parametrize("ema_start", [0, 7])
def test_a_resumed_phase_ends_with_the_same_average(tmp_path: Path, ema_start: int) -> None:
    ref = _run(tmp_path / "ref.ckpt", ema_decay=0.8, ema_start=ema_start).state_dict()
    with pytest.raises(_Interrupt):  # dies during step 8: last.ckpt holds step 5 and its average
        _run(tmp_path / "a.ckpt", ema_decay=0.8, ema_start=ema_start, fail_at=8)
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert ckpt["step"] == 5 and "ema" in ckpt
    resumed = _run(tmp_path / "a.ckpt", ema_decay=0.8, ema_start=ema_start).state_dict()
    assert _equal(resumed, ref)
    # a finished phase, run again, returns at once with the same averaged weights
    again = _run(tmp_path / "a.ckpt", ema_decay=0.8, ema_start=ema_start, fail_at=1).state_dict()
    assert _equal(again, ref)


# --------------------------------------------------------------------------- the stages


def _stage_cfg(data: dict[str, Path], out: Path, **overrides: Any):
    return parse_config(small_config_dict(data, out, **overrides))


def test_teacher_finetune_ends_with_the_average_and_resumes_to_it(
    demo_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The BN teacher with norm_eval, as the recipe finetunes it: teacher.pt holds the full
    finetune's average (the BN statistics stay frozen), and a finetune interrupted mid-way ends
    bit-identical to an uninterrupted one."""
    cfg = _stage_cfg(
        demo_data,
        tmp_path,
        teacher__model=BN_TEACHER,
        teacher__norm_eval=True,
        checkpoint_every=2,
        finetune_teacher__linear_probe__steps=2,
        finetune_teacher__full_finetune__steps=5,
        finetune_teacher__full_finetune__ema_decay=0.6,
    )
    torch.manual_seed(0)  # the random-init teacher (a pretrained one would not care)
    ref = pipeline.finetune_teacher(cfg, {}, tmp_path / "ref")
    teacher = torch.load(ref["checkpoint"], weights_only=False)["state_dict"]
    last = torch.load(tmp_path / "ref" / "last.ckpt", weights_only=False)
    average = last["ema"]["average"]
    changed = 0
    for k, v in teacher.items():
        if f"teacher.{k}" in average:
            assert torch.equal(v, average[f"teacher.{k}"]), k
            changed += not torch.equal(v, last["modules"]["teacher"][k])
        else:
            assert torch.equal(v, last["modules"]["teacher"][k]), k
        if k.endswith("running_mean"):  # norm_eval: the averaged statistics are the frozen ones
            assert torch.equal(v, torch.zeros_like(v)), k
    assert changed > 10  # the weights are the average, not the last step's

    real = pipeline.train_loop

    def interrupted(**kwargs: Any) -> Any:
        if kwargs["task"] != "teacher finetune":
            return real(**kwargs)
        step_fn, calls = kwargs["step_fn"], {"n": 0}

        def step(batch: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 4:
                raise _Interrupt
            return step_fn(batch)

        return real(**{**kwargs, "step_fn": step})

    out = tmp_path / "resumed"
    monkeypatch.setattr(pipeline, "train_loop", interrupted)
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        pipeline.finetune_teacher(cfg, {}, out)
    monkeypatch.setattr(pipeline, "train_loop", real)
    assert torch.load(out / "last.ckpt", weights_only=False)["step"] == 2
    torch.manual_seed(999)  # as in a fresh process: the checkpoints, not the seed, decide the rest
    res = pipeline.finetune_teacher(cfg, {}, out)
    assert res["timings"]["full_finetune"]["resumed_from"] == 2
    assert _equal(torch.load(res["checkpoint"], weights_only=False)["state_dict"], teacher)


def test_student_finetune_averages_channels_last_weights_and_bn_statistics(
    demo_data: dict[str, Path], tmp_path: Path
) -> None:
    """A conv student in channels_last whose BN statistics move (no norm_eval): the average covers
    them too, and EMA off ends with the last step's weights as before."""
    for decay in (None, 0.5):
        cfg = _stage_cfg(
            demo_data,
            tmp_path,
            student__model=STUDENT,
            finetune_student__steps=3,
            finetune_student__ema_decay=decay,
        )
        out = tmp_path / f"fs_{decay}"
        res = pipeline.finetune_student(cfg, {}, out)
        student = torch.load(res["checkpoint"], weights_only=False)["state_dict"]
        last = torch.load(out / "last.ckpt", weights_only=False)
        live = last["modules"]["student"]
        if decay is None:
            assert "ema" not in last and _equal(student, live)
            continue
        average = last["ema"]["average"]
        stats = [k for k in student if k.endswith("running_var")]
        assert stats and all(f"student.{k}" in average for k in stats)
        for k, v in student.items():
            expected = average.get(f"student.{k}", live[k])
            assert torch.equal(v, expected), k
        assert any(not torch.equal(student[k], live[k]) for k in stats)
        assert any(
            v.ndim == 4 and v.is_contiguous(memory_format=torch.channels_last) for v in average.values()
        )

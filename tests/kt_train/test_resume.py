"""Resuming: the sampler stream, the training loop, and a real ``kt train`` killed mid-distillation."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from kt_train import pipeline
from kt_train.config import parse_config
from kt_train.train import StreamSampler, batches, train_loop

# --------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("n", [1, 7, 10])
@pytest.mark.parametrize("start", [0, 1, 3, 7, 10, 15, 23, 39])
def test_stream_sampler_resumes_exactly(n: int, start: int) -> None:
    stop = 40
    full = list(StreamSampler(n, seed=3, start=0, stop=stop))
    tail = list(StreamSampler(n, seed=3, start=start, stop=stop))
    assert len(full) == stop == len(StreamSampler(n, 3, 0, stop))
    assert tail == full[start:]
    assert len(StreamSampler(n, 3, start, stop)) == len(tail)


def test_stream_sampler_is_a_stream_of_permutations() -> None:
    n = 9
    stream = list(StreamSampler(n, seed=0, start=0, stop=5 * n))
    epochs = [stream[i * n : (i + 1) * n] for i in range(5)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert len({tuple(e) for e in epochs}) > 1  # each epoch is reshuffled
    other = list(StreamSampler(n, seed=1, start=0, stop=5 * n))
    assert other != stream  # the seed matters
    assert list(StreamSampler(n, seed=0, start=0, stop=5 * n)) == stream  # and decides everything


def test_stream_sampler_empty_range() -> None:
    assert list(StreamSampler(5, 0, 10, 10)) == []
    assert len(StreamSampler(5, 0, 12, 10)) == 0


class _Indexed(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


def test_batches_from_a_start_step_are_the_tail() -> None:
    ds = _Indexed(11)
    full = [b[2].tolist() for b in batches(ds, 4, seed=5, start_step=0, steps=9)]
    tail = [b[2].tolist() for b in batches(ds, 4, seed=5, start_step=6, steps=9)]
    assert len(full) == 9 and all(len(b) == 4 for b in full)
    assert tail == full[6:]


# --------------------------------------------------------------------------- the loop


class _Interrupt(Exception):
    pass


def _run_loop(
    ckpt: Path, steps: int, fail_at: int | None = None, seen: list | None = None
) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ds = _Indexed(13)
    count = {"n": 0}

    def step(batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, y, idx = batch
        if seen is not None:
            seen.append(idx.tolist())
        count["n"] += 1
        if fail_at is not None and count["n"] == fail_at:
            raise _Interrupt
        return nn.functional.cross_entropy(model(x), y), {}

    res = train_loop(
        task="t",
        modules={"m": model},
        groups=[{"params": list(model.parameters())}],
        step_fn=step,
        dataset=ds,
        batch_size=4,
        steps=steps,
        lr=0.05,
        warmup_steps=3,
        seed=1,
        ckpt_path=ckpt,
        checkpoint_every=5,
        log_every=2,
    )
    return model, res


def test_train_loop_resumes_to_the_same_weights(tmp_path: Path) -> None:
    ref_seen: list = []
    ref, ref_res = _run_loop(tmp_path / "ref.ckpt", 17, seen=ref_seen)
    assert ref_res.resumed_from == 0 and ref_res.steps == 17

    with pytest.raises(_Interrupt):
        _run_loop(tmp_path / "a.ckpt", 17, fail_at=13)  # dies during step 13: last.ckpt holds step 10
    assert torch.load(tmp_path / "a.ckpt", weights_only=False)["step"] == 10
    seen: list = []
    model, res = _run_loop(tmp_path / "a.ckpt", 17, seen=seen)
    assert res.resumed_from == 10
    assert seen == ref_seen[10:]  # the batches the interrupted run would have drawn
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # optimizer state, lr schedule and data all continued exactly
    assert [h["step"] for h in res.history] == [*range(2, 17, 2), 17]
    assert [h["step"] for h in res.history] == [h["step"] for h in ref_res.history]
    assert torch.load(tmp_path / "a.ckpt", weights_only=False)["step"] == 17

    # A finished loop returns at once.
    again, res = _run_loop(tmp_path / "a.ckpt", 17, fail_at=1)
    assert res.resumed_from == 17
    for a, b in zip(again.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_interrupted_distill_resumes_to_identical_weights(
    small_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With augmentation (global RNG) in play, a resumed stage ends bit-identical to an uninterrupted one."""
    cfg = parse_config(
        small_config(tmp_path, checkpoint_every=5, distill__steps=10, finetune_teacher__linear_probe__steps=2)
    )
    teacher = pipeline.finetune_teacher(cfg, {}, tmp_path / "finetune_teacher")
    inputs = {"teacher": teacher["checkpoint"]}
    torch.manual_seed(0)
    ref = pipeline.distill(cfg, dict(inputs), tmp_path / "ref")

    real = pipeline.train_loop

    def interrupted(**kwargs: Any) -> Any:
        step_fn, calls = kwargs["step_fn"], {"n": 0}

        def step(batch: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 8:
                raise _Interrupt
            return step_fn(batch)

        return real(**{**kwargs, "step_fn": step})

    out = tmp_path / "resumed"
    monkeypatch.setattr(pipeline, "train_loop", interrupted)
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        pipeline.distill(cfg, dict(inputs), out)
    monkeypatch.setattr(pipeline, "train_loop", real)
    assert not (out / "_SUCCESS").exists()
    assert torch.load(out / "last.ckpt", weights_only=False)["step"] == 5

    torch.manual_seed(999)  # as in a fresh process: the checkpoint, not the seed, decides the rest
    res = pipeline.distill(cfg, dict(inputs), out)
    assert res["timings"]["distill"]["resumed_from"] == 5
    a = torch.load(ref["checkpoint"], weights_only=False)["state_dict"]
    b = torch.load(res["checkpoint"], weights_only=False)["state_dict"]
    for k, v in a.items():
        assert torch.equal(b[k], v), k


# --------------------------------------------------------------------------- a real process, killed


def _step_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
    except Exception:  # being replaced right now
        return -1


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_kt_train_killed_mid_distill_resumes(
    small_config, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    out = tmp_path / "run"
    steps = 60
    cfg = small_config(
        out,
        stages=["finetune_teacher", "distill"],
        checkpoint_every=5,
        finetune_teacher__linear_probe__steps=3,
        distill__steps=steps,
        distill__batch_size=16,
    )
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "kt_train.cli", "train", "-c", str(cfg_path)]
    ckpt = out / "distill" / "last.ckpt"
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        last_mtime = None
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and ckpt.stat().st_mtime_ns != last_mtime:
                last_mtime = ckpt.stat().st_mtime_ns
                step = _step_of(ckpt)
                if step >= 10:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
    first_log = (tmp_path / "first.log").read_text(errors="replace")
    assert killed_at is not None, (
        f"the run ended (rc {proc.returncode}) before it could be killed:\n{first_log[-3000:]}"
    )
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "distill" / "_SUCCESS").exists()
    assert killed_at < steps
    teacher_marker = out / "finetune_teacher" / "_SUCCESS"
    assert teacher_marker.exists()
    teacher_stamps = {p.name: p.stat().st_mtime_ns for p in (out / "finetune_teacher").iterdir()}

    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    # finetune_teacher was not redone: nothing in its directory was rewritten.
    assert {p.name: p.stat().st_mtime_ns for p in (out / "finetune_teacher").iterdir()} == teacher_stamps
    assert (out / "distill" / "_SUCCESS").exists()
    outputs = json.loads((out / "distill" / "outputs.json").read_text())
    resumed_from = outputs["timings"]["distill"]["resumed_from"]
    print(f"killed at step {killed_at} of {steps}; resumed from step {resumed_from}")
    assert 10 <= resumed_from < steps
    assert resumed_from % 5 == 0  # a checkpoint_every boundary
    history = json.loads((out / "distill" / "history.json").read_text())["distill"]
    assert history[-1]["step"] == steps
    assert [h["step"] for h in history] == list(range(10, steps + 1, 10))  # continuous, nothing repeated
    assert torch.load(ckpt, weights_only=False)["step"] == steps
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"finetune_teacher", "distill"}


@pytest.mark.parametrize(("sync_every", "raised_by"), [(1, 4), (4, 4), (6, 5)])
def test_non_finite_loss_stops_the_loop_at_the_next_sync_and_is_never_checkpointed(
    tmp_path: Path, sync_every: int, raised_by: int
) -> None:
    """On an accelerator the loss is read every few steps (no host sync per step); a NaN at step 4
    is still caught, at the latest at the next sync point or before a checkpoint is written."""
    from kt_train.errors import TrainingError

    model = nn.Linear(4, 2)
    count = {"n": 0}

    def step(batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        count["n"] += 1
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return (loss * float("nan") if count["n"] == 4 else loss), {"acc": torch.tensor(0.5)}

    with pytest.raises(TrainingError, match=rf"by step {raised_by}; lower the learning rate"):
        train_loop(
            task="t",
            modules={"m": model},
            groups=[{"params": list(model.parameters())}],
            step_fn=step,
            dataset=_Indexed(40),
            batch_size=4,
            steps=10,
            lr=0.05,
            warmup_steps=0,
            seed=1,
            ckpt_path=tmp_path / "c.ckpt",
            checkpoint_every=5,
            log_every=100,
            sync_every=sync_every,
        )
    assert not (tmp_path / "c.ckpt").exists()  # the step-5 checkpoint would have held NaN weights

"""Data-parallel distillation under torchrun (gloo on CPU): the ranks together train exactly the
single-process student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kt_train.models import load_checkpoint
from kt_train.train import StreamSampler

from ..conftest import small_config_dict


def test_sharded_stream_sampler_splits_every_global_batch() -> None:
    single = list(StreamSampler(10, 3, 8, 40, batch_size=8))
    r0 = list(StreamSampler(10, 3, 8, 40, batch_size=8, rank=0, world=2))
    r1 = list(StreamSampler(10, 3, 8, 40, batch_size=8, rank=1, world=2))
    assert len(r0) == len(r1) == len(single) // 2 == len(StreamSampler(10, 3, 8, 40, batch_size=8, world=2))
    for k in range(len(single) // 8):
        assert r0[4 * k : 4 * k + 4] + r1[4 * k : 4 * k + 4] == single[8 * k : 8 * k + 8]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_torchrun_two_ranks_train_the_single_process_student(
    demo_data: dict[str, Path], tmp_path: Path
) -> None:
    # ViT student (layer norm, no batch statistics) and cached teacher outputs (views fixed per
    # item): the two ranks' averaged gradients equal the single process's, so the weights match.
    def config(out: Path) -> Path:
        cfg = small_config_dict(
            demo_data,
            out,
            student={"model": "timm:test_vit", "image_size": 32},
            distill={"steps": 4, "batch_size": 8, "lr": 1e-3, "cache": {"mode": "cached", "views": 2}},
            stages=["finetune_teacher", "distill"],
        )
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return path

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "kt_train.cli", "train", "-c", str(config(single))], tmp_path)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29613",
            "-m",
            "kt_train.cli",
            "train",
            "-c",
            str(config(ddp)),
        ],
        tmp_path,
    )
    outs = json.loads((ddp / "distill" / "outputs.json").read_text())
    assert outs["lineage"]["world_size"] == 2
    assert json.loads((single / "distill" / "outputs.json").read_text())["lineage"]["world_size"] == 1
    # the teacher stage ran once (rank 0) and the same teacher file fed both ranks' cache
    assert (ddp / "finetune_teacher" / "teacher.pt").exists()
    assert len(list((ddp / "teacher_cache").glob("*/cache.json"))) == 1
    a, _ = load_checkpoint(single / "distill" / "student.pt")
    b, _ = load_checkpoint(ddp / "distill" / "student.pt")
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=2e-5, rtol=1e-4, msg=k)

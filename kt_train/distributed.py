"""Data-parallel distillation under ``torchrun``.

``torchrun --nproc_per_node N -m kt_train.cli train -c config.yaml`` (or the ``kt`` script) starts N
processes. The distill stage runs in all of them: each rank takes its slice of every global batch
(``distill.batch_size`` is the global batch, so a recipe means the same on 1 or N GPUs), the
student is wrapped in ``DistributedDataParallel`` (gradients averaged), and rank 0 alone writes
checkpoints and outputs. Every other stage runs on rank 0 while the others wait; they then read
its outputs from disk. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["barrier", "init_from_env", "is_distributed", "local_device", "rank", "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); no-op otherwise or if joined.

    Ranks wait for rank 0's non-distributed stages (a teacher finetune can take hours), hence
    the long timeout.
    """
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=24))
    return True


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this process's GPU (LOCAL_RANK)."""
    if is_distributed() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device

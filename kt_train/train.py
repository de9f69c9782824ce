"""One training loop for every stage (teacher finetune, distillation, student finetune).

Step-based, resumable to the exact step: the sampler is an endless stream of seeded permutations,
so the batches after a resume are the ones the interrupted run would have drawn; ``last.ckpt``
holds the trainable modules, the optimizer, the step and the loss history (and, with weight
averaging on, the running average: ``WeightAverage``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import ConfigError, TrainingError
from .io import atomic_torch_save
from .tensorboard import ScalarLog, run_name

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a config's ``precision`` (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_num_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader workers: as configured, else 0 on CPU (the cores train) and min(8, cores - 1) on CUDA."""
    if num_workers is not None:
        return num_workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r} ({e}); use 'cpu', 'cuda', 'cuda:0' or 'auto'") from e


class Reporter(Protocol):
    """Receives progress: the CLI draws bars (or, off a terminal, prints lines) from it, the worker
    writes it to the job row. Each ``task`` is one phase of the run (a training loop, the
    teacher-output cache build); ``kt_train.progress`` weighs the phases by their work and measures
    their rates. A loop resumed at step s reports ``update(task, s, ...)`` right after ``start``.
    ``run_pipeline`` also calls ``begin_stage(name)`` / ``end_stage(name, done=...)`` on a reporter
    that has them."""

    def start(self, task: str, total: int) -> None: ...
    def update(self, task: str, step: int, metrics: dict[str, float]) -> None: ...
    def finish(self, task: str) -> None: ...


class LogReporter:
    def __init__(self, every: int = 50):
        self.every = every
        self.totals: dict[str, int] = {}

    def start(self, task: str, total: int) -> None:
        self.totals[task] = total

    def update(self, task: str, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0 or step == self.totals.get(task):
            log.info(
                "%s %d/%d %s",
                task,
                step,
                self.totals.get(task, 0),
                {k: round(v, 4) for k, v in metrics.items()},
            )

    def finish(self, task: str) -> None:
        pass


class StreamSampler(Sampler[int]):
    """Positions [start, stop) of an endless stream of seeded permutations of range(n).

    Position p is permutation p // n at offset p % n, so the stream can be resumed anywhere.
    With ``world`` > 1 (data parallel), rank r keeps the r-th of ``world`` equal slices of every
    global batch of ``batch_size`` positions: the ranks together see exactly the single-process
    batches.
    """

    def __init__(
        self, n: int, seed: int, start: int, stop: int, *, batch_size: int = 1, rank: int = 0, world: int = 1
    ):
        self.n, self.seed, self.start, self.stop = n, seed, start, stop
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.local = batch_size // world

    def __len__(self) -> int:
        return max(0, self.stop - self.start) // self.world

    def _stream(self) -> Iterator[int]:
        p = self.start
        while p < self.stop:
            epoch, offset = divmod(p, self.n)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[offset:].tolist()
            take = perm[: self.stop - p]
            yield from take
            p += len(take)

    def __iter__(self) -> Iterator[int]:
        if self.world == 1:
            yield from self._stream()
            return
        for p, item in enumerate(self._stream(), start=self.start):
            if (p % self.batch_size) // self.local == self.rank:
                yield item


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start_step: int,
    steps: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    data_parallel: bool = False,
) -> DataLoader:
    """Seeded batches from ``start_step``; with ``data_parallel`` (under torchrun) this rank's slice
    of each global batch of ``batch_size``."""
    from .distributed import rank, world_size

    n = len(dataset)  # type: ignore[arg-type]
    world = world_size() if data_parallel else 1
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} does not split over {world} processes; use a multiple of {world}"
        )
    sampler = StreamSampler(
        n,
        seed,
        start_step * batch_size,
        steps * batch_size,
        batch_size=batch_size,
        rank=rank() if data_parallel else 0,
        world=world,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size // world,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=False,
    )


def param_groups(
    module: nn.Module, weight_decay: float, layer_decay: float | None = None, lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms/biases; optional layer-wise lr decay (timm's group matcher)."""
    if layer_decay is not None and hasattr(module, "group_matcher"):
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(module, weight_decay=weight_decay, layer_decay=layer_decay)
        for g in groups:
            g["lr_scale"] = g.get("lr_scale", 1.0) * lr_scale
        return groups
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]


def lr_at(step: int, steps: int, base_lr: float, warmup: int, min_ratio: float = 0.01) -> float:
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def find_batch_size(
    try_step: Callable[[int], None], *, start: int = 16, limit: int = 4096, multiple_of: int = 1
) -> int:
    """The largest batch size, doubling from ``start`` up to ``limit``, for which ``try_step(bs)``
    (one forward + backward at that size) runs without running out of memory.

    Raises ConfigError when even ``start`` does not fit. Memory is freed between tries.
    """
    if start < 1 or limit < start:
        raise ConfigError(f"batch-size search needs 1 <= start <= limit, got start={start}, limit={limit}")
    best = 0
    bs = start
    while bs <= limit:
        try:
            try_step(bs)
        except torch.OutOfMemoryError:
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        best = bs
        bs *= 2
    if best == 0:
        raise ConfigError(f"a batch of {start} does not fit in memory; use a smaller model or input size")
    return max(multiple_of, best // multiple_of * multiple_of)


class WeightAverage:
    """An exponential moving average of a phase's weights, which the phase ends with.

    Tracked: the parameters the optimizer updates and every floating-point buffer (batch-norm
    running statistics, averaged as timm's ModelEma does; under ``norm_eval`` they do not move, so
    their average is themselves). Frozen parameters and integer buffers (``num_batches_tracked``)
    are left as they are. The average lives beside the weights (same device and memory format) and
    goes into ``last.ckpt``, so a resumed phase ends with the average of an uninterrupted one.
    """

    def __init__(self, modules: dict[str, nn.Module], trainable: set[int], decay: float, start: int = 0):
        if not 0 < decay < 1:
            raise ConfigError(f"weight averaging needs 0 < ema_decay < 1, got {decay}")
        self.decay, self.start = decay, start
        self.live: dict[str, torch.Tensor] = {}
        for name, m in modules.items():
            for k, p in m.named_parameters():
                if id(p) in trainable:
                    self.live[f"{name}.{k}"] = p
            for k, b in m.named_buffers():
                if b.is_floating_point():
                    self.live[f"{name}.{k}"] = b
        self.average = {k: t.detach().clone() for k, t in self.live.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): up to ``start`` the average is the weights."""
        average, live = list(self.average.values()), [t.detach() for t in self.live.values()]
        if step <= self.start:
            for a, w in zip(average, live, strict=True):
                a.copy_(w)
        else:
            torch._foreach_lerp_(average, live, 1.0 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        """The modules' weights become the average."""
        for k, t in self.live.items():
            t.copy_(self.average[k])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "start": self.start, "average": self.average}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["average"]
        if set(saved) != set(self.average):
            raise TrainingError(
                "the weight average in the checkpoint tracks other weights than this phase "
                f"({len(saved)} vs {len(self.average)} tensors); delete the stage's last.ckpt to restart it"
            )
        for k, a in self.average.items():
            a.copy_(saved[k])


@dataclass
class LoopResult:
    steps: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    data_wait_share: float = 0.0
    # From the end of the first step on: without loader start-up (worker processes) and first-step
    # warm-up (allocations, cuDNN autotuning, compilation), which dominate short runs.
    steady_images_per_s: float = 0.0


def train_loop(
    *,
    task: str,
    modules: dict[str, nn.Module],
    groups: list[dict[str, Any]],
    step_fn: Callable[[Any], tuple[torch.Tensor, dict[str, Any]]],
    dataset: Dataset,
    batch_size: int,
    steps: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    ckpt_path: Path,
    checkpoint_every: int | None = None,
    num_workers: int = 0,
    device: torch.device | None = None,
    reporter: Reporter | None = None,
    train_mode: Callable[[], None] | None = None,
    log_every: int = 10,
    autocast_dtype: torch.dtype | None = None,
    data_parallel: bool = False,
    sync_every: int | None = None,
    ema_decay: float | None = None,
    ema_start: int = 0,
) -> LoopResult:
    """Run ``steps`` optimizer steps of ``step_fn`` over seeded batches of ``dataset``.

    ``modules`` are what the checkpoint holds (the trainable parts); ``train_mode`` puts them in
    the right mode (e.g. train mode with batch norm frozen). Resumes from ``ckpt_path`` if present.
    With ``ema_decay`` (0 < decay < 1) the modules end with an exponential moving average of their
    weights (``WeightAverage``, starting after ``ema_start`` steps) instead of the last step's.
    """
    from .distributed import rank as _rank

    is_main = _rank() == 0
    reporter = reporter or LogReporter()
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    device_type = device.type if device is not None else "cpu"
    # fp16 needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype == torch.float16)
    start, history = 0, []
    ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    if ckpt is not None:
        for name, m in modules.items():
            m.load_state_dict(ckpt["modules"][name])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history = int(ckpt["step"]), list(ckpt["history"])
        torch.set_rng_state(ckpt["rng"])
        log.info("%s: resuming from step %d (%s)", task, start, ckpt_path)
    average = None
    if ema_decay:
        trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
        average = WeightAverage(modules, trainable, ema_decay, ema_start)
        if ckpt is not None and "ema" in ckpt:
            average.load_state_dict(ckpt["ema"])
        elif start > 0:
            log.warning(
                "%s: %s holds no weight average; it starts from the step-%d weights", task, ckpt_path, start
            )
    n = len(dataset)  # type: ignore[arg-type]
    every = checkpoint_every or max(1, math.ceil(n / batch_size))

    def save(step: int) -> None:
        atomic_torch_save(
            {
                "modules": {k: m.state_dict() for k, m in modules.items()},
                "optimizer": optimizer.state_dict(),
                "step": step,
                "history": history,
                "rng": torch.get_rng_state(),
                **({"ema": average.state_dict()} if average is not None else {}),
            },
            ckpt_path,
        )

    result = LoopResult(steps=steps, resumed_from=start, history=history)
    reporter.start(task, steps)
    if start >= steps:
        if average is not None:  # a finished phase, rerun: it ends as it did the first time
            average.apply()
        reporter.finish(task)
        return result
    # the history's rows as TensorBoard curves too, in the stage directory (kt_train.tensorboard)
    curves = (
        ScalarLog(ckpt_path.parent / "tensorboard" / run_name(task), history) if is_main else ScalarLog.off()
    )
    try:
        if start > 0:  # resumed: progress picks up where the interrupted run saved, not at step 0
            last = {
                k: float(v) for k, v in (history[-1] if history else {}).items() if k not in ("step", "lr")
            }
            reporter.update(task, start, last)
        (train_mode or (lambda: [m.train() for m in modules.values()]))()
        loader = batches(
            dataset,
            batch_size,
            seed=seed,
            start_step=start,
            steps=steps,
            num_workers=num_workers,
            pin_memory=device is not None and device.type == "cuda",
            data_parallel=data_parallel,
        )
        step, t0, wait, seen = start, time.perf_counter(), 0.0, 0
        t_first = t0
        running: dict[str, float] = {}
        running_t: dict[str, torch.Tensor] = {}
        # Host syncs (reading the loss): every step on CPU, where they cost nothing; every log_every
        # steps, checkpoint and last step on an accelerator.
        sync_every = sync_every or (1 if device_type == "cpu" else log_every)
        t_data = last_save = time.perf_counter()
        # Creating the iterator draws the loader's base seed from the global RNG; undo that draw so a
        # resumed run continues the augmentation stream of the interrupted one exactly (rng in last.ckpt).
        rng = torch.get_rng_state()
        batch_iter = iter(loader)
        torch.set_rng_state(rng)
        for batch in batch_iter:
            wait += time.perf_counter() - t_data
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup_steps) * g.get("lr_scale", 1.0)
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss, metrics = step_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if average is not None:
                average.update(step)
            seen += batch_size
            if seen == batch_size:
                t_first = time.perf_counter()
            # Running means stay on the device; reading them forces a host sync, which on a GPU stalls
            # the queue of kernels, so that happens every log_every steps (every step on CPU, where it
            # costs nothing). A NaN anywhere turns the running loss NaN, so no bad step goes unseen.
            for k, v in {"loss": loss.detach(), **metrics}.items():
                v = v.float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=loss.device)
                running_t[k] = v if k not in running_t else running_t[k] * 0.9 + v * 0.1
            due = step % every == 0 and (
                checkpoint_every is not None or time.perf_counter() - last_save >= 30
            )
            if step % sync_every == 0 or step % log_every == 0 or step == steps or due:
                running = {k: float(v) for k, v in running_t.items()}
                if not math.isfinite(running["loss"]):
                    raise TrainingError(
                        f"{task}: the loss became {running['loss']} by step {step}; lower the learning rate"
                    )
            if step % log_every == 0 or step == steps:
                history.append({"step": step, "lr": optimizer.param_groups[0]["lr"], **running})
                curves.add(history[-1])
            reporter.update(task, step, running)
            # Checkpoint cadence (``due`` above): every epoch, but not more often than every 30 s (tiny
            # labeled sets have epochs of a step or two); an explicit checkpoint_every is honored exactly.
            if (due or step == steps) and is_main:
                save(step)
                last_save = time.perf_counter()
            t_data = time.perf_counter()
    finally:  # an interrupted loop closes its event file too, before a resume in this process deletes it
        curves.close()
    if average is not None:  # after the last save: last.ckpt keeps the last step's weights and the average
        average.apply()
    reporter.finish(task)
    result.seconds = time.perf_counter() - t0
    result.images_per_s = seen / max(result.seconds, 1e-9)
    result.data_wait_share = wait / max(result.seconds, 1e-9)
    if seen > batch_size:
        result.steady_images_per_s = (seen - batch_size) / max(time.perf_counter() - t_first, 1e-9)
    return result

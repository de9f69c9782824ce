"""Progress and ETA of a run over its phases: the work each phase is expected to do, the rate it is
measured to run at, and what is left.

A *phase* is one loop that reports through a ``kt_train.train.Reporter``: a training loop
("teacher linear probe", "distill", ...), the teacher-output cache build ("teacher cache"), a
gallery's embedding ("embed"). A stage that does not report (curate, evaluate, export) is one
phase of its own, done when the stage ends.

- **Weights.** A phase weighs its expected work in model passes over images: steps x batch size x
  3 for a training loop (forward and backward), views x images for the cache (a forward pass),
  steps x batch size for a linear probe (forward through the frozen trunk). A stage that does not
  report weighs ``NON_TRAINING_SHARE`` of the training work. ``plan_phases`` makes the plan of a
  training config; a phase's real size, known when it starts (``Reporter.start``), replaces the
  estimate, and a planned phase that never runs (a cache reused, ``mode: online``) drops out.
- **Progress** is monotonic: when the plan changes (a size learned, a phase dropped or added), the
  progress reached so far stays and the work left is spread over the rest of the way to 1.0.
  ``floor`` (a resumed job's progress before the resume) is never gone below.
- **ETA** is measured: each phase's rate (units/s) is an EWMA over samples of at least
  ``min_sample_s`` seconds, ready after ``min_samples`` of them, the first update of a phase
  (start-up, warm-up, the jump of a resumed loop) left out. The time left is the current phase's
  remaining units at its rate, plus each later phase's work at the rate measured for its group
  (phases that run the same models the same way, e.g. the linear probe and the cache are both
  teacher forward passes; distillation and the student finetune are both student training), else at
  the rate of work last measured. No ETA before a rate was measured.
- **Model costs.** A teacher pass and a student pass cost different times (the proxy teacher's
  forward is ~6x the student's on 2 cores), so a rate measured on the teacher says little about the
  student's loops by itself. ``plan_phases(..., model_costs=...)`` scales each phase's passes by
  the seconds per image its model measured (``kt_train.costs.measure_model_costs``: one short
  forward on this machine at the run's input sizes), which makes work comparable across models: a
  rate measured on the teacher then predicts the distillation before its first step.

No torch here: the service and the client may import this module.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

FORWARD = 1.0  # model passes per image of a forward-only loop
TRAIN = 3.0  # forward + backward
NON_TRAINING_SHARE = 0.02  # weight of a stage that does not report, as a share of the training work

INTERVAL_ENV = "KT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0

# The task names the pipeline reports under (kt_train.pipeline, kt_train.teacher_cache).
LINEAR_PROBE = "teacher linear probe"
TEACHER_FINETUNE = "teacher finetune"
TEACHER_CACHE = "teacher cache"
DISTILL = "distill"
DISTILL_AGNOSTIC = "distill (task-agnostic)"
STUDENT_FINETUNE = "student finetune"
STUDENT_FINETUNE_CHECK = "student finetune check"  # after_distillation auto: a finetune on part of the labels
EMBED = "embed"


@dataclass
class Phase:
    """One loop of a run and its expected work (see the module docstring)."""

    name: str
    units: float  # steps, views or images expected
    unit_work: float = 1.0  # images per unit: a step's batch size; 1 for a view or an image
    cost: float = FORWARD  # model passes per image
    group: str = ""  # phases of one group run at comparable rates of work
    stage: str | None = None
    unit: str = "step"
    reports: bool = True  # False: a stage that does not report, done when it ends
    done: float = 0.0
    started: bool = False
    finished: bool = False

    @property
    def work(self) -> float:
        return max(0.0, self.units) * self.unit_work * self.cost

    @property
    def done_work(self) -> float:
        return min(max(0.0, self.done), max(0.0, self.units)) * self.unit_work * self.cost


class RateMeter:
    """Units per second, smoothed: an EWMA over samples of at least ``min_sample_s`` seconds
    (``alpha = 2 / (window + 1)``: about the last ``window`` samples), ``None`` until
    ``min_samples`` samples. The first observation only sets the baseline."""

    def __init__(self, window: int = 8, min_samples: int = 3, min_sample_s: float = 1.0):
        self.alpha = 2.0 / (window + 1)
        self.min_samples, self.min_sample_s = min_samples, min_sample_s
        self.base: tuple[float, float] | None = None
        self.rate: float | None = None
        self.samples = 0

    def observe(self, units: float, now: float) -> None:
        if self.base is None or units < self.base[0]:
            self.base = (units, now)
            return
        u0, t0 = self.base
        dt = now - t0
        if dt < self.min_sample_s:
            return
        sample = (units - u0) / dt
        self.rate = sample if self.rate is None else self.alpha * sample + (1 - self.alpha) * self.rate
        self.samples += 1
        self.base = (units, now)

    @property
    def value(self) -> float | None:
        return self.rate if self.samples >= self.min_samples and self.rate else None


class ProgressTracker:
    """Progress (0..1) and ETA over ``phases`` from Reporter events (``start``/``update``/``finish``)
    and, where the caller knows them, stage boundaries (``begin_stage``/``end_stage``)."""

    def __init__(
        self,
        phases: Iterable[Phase] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        floor: float = 0.0,
        window: int = 8,
        min_samples: int = 3,
        min_sample_s: float = 1.0,
    ):
        self.phases: list[Phase] = [Phase(**vars(p)) for p in phases]
        self.clock = clock
        self.stage: str | None = None
        self.current: Phase | None = None
        self.last: Phase | None = None  # the phase that reported last
        self._meter_args = (window, min_samples, min_sample_s)
        self.meter = RateMeter(*self._meter_args)
        self.started_at: float | None = None  # when the current phase started
        self.group_rates: dict[str, float] = {}  # work (passes x images) per second, last measured
        self.last_work_rate: float | None = None
        self._anchor = (0.0, 0.0)  # (progress, done work) when the plan last changed
        self._high = max(0.0, min(1.0, float(floor or 0.0)))

    # --- the plan
    def _totals(self) -> tuple[float, float]:
        return sum(p.work for p in self.phases), sum(p.done_work for p in self.phases)

    def _raw(self) -> float:
        total, done = self._totals()
        p0, d0 = self._anchor
        if total <= 0:
            return p0
        left = total - d0
        if left <= 0:
            return 1.0
        return min(1.0, p0 + (1.0 - p0) * max(0.0, done - d0) / left)

    def _replan(self, change: Callable[[], None]) -> None:
        """Apply ``change`` to the plan keeping the progress reached (see the module docstring)."""
        p = self._raw()
        change()
        self._anchor = (p, self._totals()[1])

    def _find(self, task: str) -> Phase | None:
        open_ = [p for p in self.phases if p.name == task and not p.finished]
        if self.stage is not None:
            return next((p for p in open_ if p.stage == self.stage), None)
        return open_[0] if open_ else None

    def _frontier(self) -> int:
        """Where a phase not in the plan goes: after the last one started or finished."""
        return 1 + max((i for i, p in enumerate(self.phases) if p.started or p.finished), default=-1)

    def _skip_unstarted_before(self, index: int) -> None:
        """Planned phases before ``index`` that never started will not run (a cache reused, a
        stage skipped): their work leaves the plan."""
        for p in self.phases[:index]:
            if not p.started and not p.finished:
                p.units, p.finished = 0.0, True

    def mark_done(self, stage: str) -> None:
        """``stage`` was finished before (by an earlier attempt): all its work is done."""
        for p in self.phases:
            if p.stage == stage and not p.finished:
                p.done, p.started, p.finished = p.units, True, True

    def begin_stage(self, stage: str) -> None:
        self.stage = stage
        idx = next((i for i, p in enumerate(self.phases) if p.stage == stage), None)
        if idx is None:
            return
        self._replan(lambda: self._skip_unstarted_before(idx))
        for p in self.phases:
            if p.stage == stage and not p.reports and not p.finished:
                p.started = True
                self._enter(p)

    def end_stage(self, stage: str, *, done: bool = False) -> None:
        """``stage`` ended: what does not report is done now, and so is everything when ``done`` (an
        earlier attempt finished the stage); a reporting phase that never started will not run."""
        ours = [p for p in self.phases if p.stage == stage and not p.finished]
        for p in ours:
            if done or not p.reports:
                p.done, p.started, p.finished = p.units, True, True

        def drop() -> None:
            for p in ours:
                if not p.finished:  # never started, or stopped short: the rest will not run
                    p.units, p.finished = p.done, True

        self._replan(drop)
        if self.current is not None and self.current.stage == stage:
            self.current = None
        if self.stage == stage:
            self.stage = None

    def _enter(self, p: Phase) -> None:
        self.current = self.last = p
        self.meter = RateMeter(*self._meter_args)
        self.started_at = self.clock()

    # --- Reporter events
    def start(self, task: str, total: float) -> Phase:
        found = self._find(task)
        holder: list[Phase] = []

        def change() -> None:
            p = found
            if p is None:
                p = Phase(task, float(total), group=task, stage=self.stage)
                self.phases.insert(self._frontier(), p)
            p.units, p.done, p.started = float(total), 0.0, True
            self._skip_unstarted_before(self.phases.index(p))
            holder.append(p)

        self._replan(change)
        self._enter(holder[0])
        return holder[0]

    def update(self, task: str, done: float) -> Phase:
        p = self.current if self.current is not None and self.current.name == task else self._find(task)
        if p is None or not p.started:  # an update without a start: a loop that only updates
            p = self.start(task, p.units if p is not None else done)
        if done > p.units:
            self._replan(lambda: setattr(p, "units", float(done)))
        p.done = max(p.done, float(done))
        if p is self.current:
            self.meter.observe(float(done), self.clock())
            rate = self.meter.value
            if rate is not None:
                work_rate = rate * p.unit_work * p.cost
                if p.group:
                    self.group_rates[p.group] = work_rate
                self.last_work_rate = work_rate
        self.last = p
        return p

    def finish(self, task: str) -> None:
        p = self.current if self.current is not None and self.current.name == task else self._find(task)
        if p is None:
            return
        p.done, p.started, p.finished = p.units, True, True
        if p is self.current:
            self.current = None

    # --- what the user sees
    def progress(self) -> float:
        """0..1, never lower than before (nor than ``floor``)."""
        self._high = max(self._high, self._raw())
        return self._high

    def phase_rate(self, p: Phase | None = None) -> float | None:
        """The measured rate of phase ``p`` (default: the current one) in units/s."""
        p = p or self.current
        if p is None:
            return None
        if p is self.current or (self.current is None and p is self.last):
            return self.meter.value
        return None

    def _work_rate(self, p: Phase) -> float | None:
        own = self.phase_rate(p)
        if own is not None and not p.finished:
            return own * p.unit_work * p.cost
        return self.group_rates.get(p.group) or self.last_work_rate

    def phase_eta_s(self, p: Phase | None = None) -> float | None:
        """Seconds left in phase ``p`` (default: the current one), at its measured rate."""
        p = p or self.current
        if p is None or p.finished:
            return 0.0 if p is not None else None
        rate = self._work_rate(p)
        if not rate:
            return None
        return max(0.0, p.work - p.done_work) / rate

    def eta_s(self) -> float | None:
        """Seconds left in the whole plan (see the module docstring); ``None`` before any rate
        was measured."""
        left = 0.0
        for p in self.phases:
            if p.finished or p.work <= 0:
                continue
            rate = self._work_rate(p)
            if not rate:
                return None
            left += max(0.0, p.work - p.done_work) / rate
        return left


# --------------------------------------------------------------------------- the plan of a config


def plan_phases(
    cfg: Any, transfer_size: int | None = None, model_costs: Mapping[str, float] | None = None
) -> list[Phase]:
    """The phases ``cfg.stages`` run, in order, with their expected work (module docstring).

    ``transfer_size``: images in the transfer set, when known (else ``curate.size`` when a curate
    stage makes it; else the cache is estimated from the schedule and sized when it starts).
    ``model_costs``: measured seconds per image of a ``"teacher"`` and a ``"student"`` forward
    pass (``kt_train.costs``); passes of each model are weighed by them (module docstring), else
    every pass weighs the same."""
    from .pipeline import _use_cache, cache_views, run_order

    costs = dict(model_costs or {})
    unit = min((v for v in costs.values() if v and v > 0), default=1.0)
    t_pass = max(float(costs.get("teacher") or unit), 1e-12) / unit
    s_pass = max(float(costs.get("student") or unit), 1e-12) / unit

    stages = run_order(cfg.stages)
    phases: list[Phase] = []
    others: list[Phase] = []
    for stage in stages:
        if stage == "finetune_teacher":
            lp, ff = cfg.finetune_teacher.linear_probe, cfg.finetune_teacher.full_finetune
            phases.append(Phase(LINEAR_PROBE, lp.steps, lp.batch_size, FORWARD * t_pass, "teacher forward", stage))
            if ff.steps > 0:
                phases.append(
                    Phase(TEACHER_FINETUNE, ff.steps, ff.batch_size, TRAIN * t_pass, "teacher train", stage)
                )
        elif stage == "distill":
            dc = cfg.distill
            n = transfer_size
            if n is None and "curate" in stages and cfg.curate.gallery:
                n = int(cfg.curate.size)
            if dc.cache.mode == "online":
                views = 0.0
            elif n is None:  # sized when it starts; meanwhile the share of the passes it saves
                views = dc.steps * dc.batch_size / float(dc.cache.replays or 2)
            else:
                views = float(cache_views(dc, n) * n) if _use_cache(dc, n) else 0.0
            if views:
                phases.append(
                    Phase(TEACHER_CACHE, views, 1, FORWARD * t_pass, "teacher forward", stage, unit="view")
                )
            agnostic = dc.method == "task_agnostic"
            phases.append(
                Phase(
                    DISTILL_AGNOSTIC if agnostic else DISTILL,
                    dc.steps,
                    dc.batch_size,
                    TRAIN * s_pass if views else TRAIN * s_pass + FORWARD * t_pass,
                    "student train" if views and not agnostic else "distill online",
                    stage,
                )
            )
        elif stage == "finetune_student":
            fs = cfg.finetune_student
            distilled = "distill" in stages and cfg.distill.method == "task_oriented"
            if distilled and fs.after_distillation == "auto" and cfg.data.val is None:
                # the check's finetune, then (planned; skipped if the check keeps the distilled one) the finetune
                phases.append(
                    Phase(STUDENT_FINETUNE_CHECK, fs.steps, fs.batch_size, TRAIN * s_pass, "student train", stage)
                )
            kept = distilled and not fs.after_distillation
            phases.append(
                Phase(STUDENT_FINETUNE, 0 if kept else fs.steps, fs.batch_size, TRAIN * s_pass, "student train", stage)
            )
        elif stage == "curate" and not cfg.curate.gallery:
            continue  # skipped: distill uses data.transfer
        else:
            p = Phase(stage, 1.0, group=f"stage {stage}", stage=stage, reports=False)
            phases.append(p)
            others.append(p)
    training = sum(p.work for p in phases if p.reports)
    for p in others:
        p.unit_work = max(1.0, NON_TRAINING_SHARE * training)
    return phases


# --------------------------------------------------------------------------- progress lines


def format_duration(seconds: float | None) -> str:
    """``6m48s``, ``1h02m``, ``13s``; ``?`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(max(0.0, float(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def rate_text(p: Phase, units_per_s: float) -> str:
    if p.unit == "view":
        return f"{units_per_s:.0f} views/s"
    if p.unit_work > 1 or p.unit == "image":
        return f"{units_per_s * p.unit_work:.0f} img/s"
    return f"{units_per_s:.2f} {p.unit}s/s"


def progress_interval(value: float | None = None) -> float:
    """Seconds between progress lines: ``value``, else ``KT_PROGRESS_INTERVAL``, else 30."""
    if value is not None:
        return float(value)
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def phase_line(tracker: ProgressTracker, p: Phase) -> str:
    """``distill: step 1200/4000 (30%), 410 img/s, ETA 6m48s; run 45%, ETA 12m03s``."""
    total = max(p.units, 0.0)
    pct = 100.0 * p.done / total if total else 100.0
    bits = [f"{p.name}: {p.unit} {p.done:.0f}/{total:.0f} ({pct:.0f}%)"]
    rate = tracker.phase_rate(p)
    if rate is not None:
        bits.append(rate_text(p, rate))
        bits.append(f"ETA {format_duration(tracker.phase_eta_s(p))}")
    line = ", ".join(bits)
    if len([q for q in tracker.phases if q.work > 0]) > 1:
        eta = tracker.eta_s()
        run = f"run {100 * tracker.progress():.0f}%"
        line += f"; {run}, ETA {format_duration(eta)}" if eta is not None else f"; {run}"
    return line


class LineReporter:
    """A ``Reporter`` for output that is not a terminal (logs, CI, ``nohup``): a line when a phase
    starts and ends, and a progress line (``phase_line``) at most every ``interval_s`` seconds."""

    def __init__(
        self,
        tracker: ProgressTracker | None = None,
        *,
        stream: IO[str] | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] | None = None,
    ):
        self.tracker = tracker or ProgressTracker(clock=clock or time.monotonic)
        if clock is not None:
            self.tracker.clock = clock
        self.stream = stream
        self.interval_s = progress_interval(interval_s)
        self.last_line = float("-inf")

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def begin_stage(self, stage: str) -> None:
        self.tracker.begin_stage(stage)

    def end_stage(self, stage: str, *, done: bool = False) -> None:
        self.tracker.end_stage(stage, done=done)

    def start(self, task: str, total: int) -> None:
        p = self.tracker.start(task, total)
        self._print(f"{task}: started, {total} {p.unit}s")
        self.last_line = self.tracker.clock()

    def update(self, task: str, step: int, metrics: dict[str, float] | None = None) -> None:
        p = self.tracker.update(task, step)
        now = self.tracker.clock()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            values = " ".join(
                f"{k}={v:.4g}" for k, v in (metrics or {}).items() if isinstance(v, int | float)
            )
            self._print(phase_line(self.tracker, p) + (f" [{values}]" if values else ""))

    def finish(self, task: str) -> None:
        p = self.tracker.current if self.tracker.current and self.tracker.current.name == task else None
        started = self.tracker.started_at
        self.tracker.finish(task)
        if p is not None and started is not None:
            took = self.tracker.clock() - started
            self._print(f"{task}: done, {p.units:.0f} {p.unit}s in {format_duration(took)}")
        else:
            self._print(f"{task}: done")

    def report(self, task: str, done: int, total: int) -> None:
        """A loop that reports (done, total) pairs (a gallery's embedding)."""
        p = self.tracker.current
        if p is None or p.name != task:
            self.start(task, total)
        elif total != p.units:
            self.tracker._replan(lambda: setattr(p, "units", float(total)))
        self.update(task, done)
        if done >= total:
            self.finish(task)

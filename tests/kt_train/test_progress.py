"""Progress and ETA over the phases of a run (issue 13 item 4): the teacher-output cache is a phase
of its own, progress never goes down, the ETA comes from measured rates, and `kt train` / `kt
gallery build` print periodic progress lines when their output is not a terminal."""

from __future__ import annotations

import io
import re
import subprocess
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from kt_train import cli
from kt_train.config import parse_config
from kt_train.progress import (
    DISTILL,
    LINEAR_PROBE,
    STUDENT_FINETUNE,
    TEACHER_CACHE,
    LineReporter,
    Phase,
    ProgressTracker,
    format_duration,
    plan_phases,
)

from ..conftest import UNLABELED, VENV_BIN


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cached_cfg(small_config, out: Path, **overrides: Any):
    """Teacher probe, a teacher-output cache of 2 views per transfer image, distill, student finetune."""
    overrides = {"distill__cache": {"mode": "cached", "views": 2, "batch_size": 16}, **overrides}
    return parse_config(
        small_config(out, stages=["finetune_teacher", "distill", "finetune_student"], **overrides)
    )


class Recorder:
    """A Reporter that keeps (event, task, progress) after every call (stage-aware, like the CLI's)."""

    def __init__(self, tracker: ProgressTracker):
        self.tracker = tracker
        self.events: list[tuple[str, str, float]] = []

    def _note(self, event: str, task: str) -> None:
        self.events.append((event, task, self.tracker.progress()))

    def begin_stage(self, stage: str) -> None:
        self.tracker.begin_stage(stage)
        self._note("begin_stage", stage)

    def end_stage(self, stage: str, *, done: bool = False) -> None:
        self.tracker.end_stage(stage, done=done)
        self._note("end_stage", stage)

    def start(self, task: str, total: int) -> None:
        self.tracker.start(task, total)
        self._note("start", task)

    def update(self, task: str, step: int, metrics: dict[str, float]) -> None:
        self.tracker.update(task, step)
        self._note("update", task)

    def finish(self, task: str) -> None:
        self.tracker.finish(task)
        self._note("finish", task)


def _monotonic(values: list[float]) -> bool:
    return all(b >= a for a, b in pairwise(values))


# --------------------------------------------------------------------------- the tracker


def test_progress_is_monotonic_and_the_cache_build_is_a_phase_of_its_own(small_config, tmp_path) -> None:
    """Driven through probe -> cache build -> distill -> finetune as the pipeline reports them: the
    bar moves through the cache build (it used to sit at the distill stage's share from the first
    cache batch to the last distill step), and never goes back, also when the cache's real size
    replaces the plan's estimate."""
    cfg = _cached_cfg(small_config, tmp_path / "run", distill__steps=10)
    tracker = ProgressTracker(plan_phases(cfg), clock=FakeClock())
    rec = Recorder(tracker)
    rec.begin_stage("finetune_teacher")
    rec.start(LINEAR_PROBE, 4)
    for step in range(1, 5):
        rec.update(LINEAR_PROBE, step, {})
    rec.finish(LINEAR_PROBE)
    rec.end_stage("finetune_teacher")
    rec.begin_stage("distill")
    views = 2 * UNLABELED
    rec.start(TEACHER_CACHE, views)
    for done in range(16, views + 1, 16):
        rec.update(TEACHER_CACHE, done, {})
    rec.finish(TEACHER_CACHE)
    rec.start(DISTILL, 10)
    for step in range(1, 11):
        rec.update(DISTILL, step, {})
    rec.finish(DISTILL)
    rec.end_stage("distill")
    rec.begin_stage("finetune_student")
    rec.start(STUDENT_FINETUNE, 4)
    for step in range(1, 5):
        rec.update(STUDENT_FINETUNE, step, {})
    rec.finish(STUDENT_FINETUNE)
    rec.end_stage("finetune_student")

    progress = [p for _, _, p in rec.events]
    assert _monotonic(progress), progress
    assert progress[-1] == 1.0
    cache = [p for event, task, p in rec.events if task == TEACHER_CACHE and event == "update"]
    distill = [p for event, task, p in rec.events if task == DISTILL and event == "update"]
    # every cache batch moves the bar, and the cache is a real share of the run
    assert len(cache) == 6 and all(b > a for a, b in pairwise(cache)), cache
    at_start = next(p for event, task, p in rec.events if (event, task) == ("start", TEACHER_CACHE))
    assert cache[-1] - at_start > 0.1
    # ... and so does every distill step after it: nothing sits at one value through the stage
    assert all(b > a for a, b in pairwise(distill))
    assert distill[0] > cache[-1] and distill[-1] - distill[0] > 0.3


def test_the_weights_follow_the_expected_work(small_config, tmp_path) -> None:
    cfg = _cached_cfg(small_config, tmp_path / "run", distill__steps=40)
    plan = {p.name: p for p in plan_phases(cfg, transfer_size=UNLABELED)}
    assert list(plan) == [LINEAR_PROBE, TEACHER_CACHE, DISTILL, STUDENT_FINETUNE]
    assert plan[LINEAR_PROBE].work == 4 * 8  # steps x batch, a forward pass
    assert plan[TEACHER_CACHE].work == 2 * UNLABELED  # views x images
    assert plan[DISTILL].work == 40 * 8 * 3  # steps x batch, forward + backward
    assert plan[STUDENT_FINETUNE].work == 4 * 8 * 3
    online = plan_phases(_cached_cfg(small_config, tmp_path / "run", distill__cache={"mode": "online"}))
    assert TEACHER_CACHE not in [p.name for p in online]
    # the recipe keeps a task-distilled student as distilled: no finetune work planned
    kept = plan_phases(
        _cached_cfg(small_config, tmp_path / "run", finetune_student__after_distillation=False)
    )
    assert next(p for p in kept if p.name == STUDENT_FINETUNE).work == 0


def test_measured_model_costs_let_the_teachers_rate_predict_the_students_loops(
    small_config, tmp_path
) -> None:
    """A teacher pass costing 6 student passes (the proxy teacher and the benchmark's student): with
    the measured costs in the plan, the rate measured during the linear probe predicts the cache
    build and the distillation to within a few percent; without them the ETA is several times too
    long (a job's ETA at its start was 5h26m for an hour's work)."""
    cfg = _cached_cfg(small_config, tmp_path / "run", distill__steps=40)
    teacher_s, student_s = 6e-3, 1e-3  # seconds per image of a forward pass

    def simulate(plan: list[Phase]) -> tuple[float, float]:
        """(ETA after the linear probe, the time the rest really takes) on a clock that runs each
        phase at its model's true cost."""
        clock = FakeClock()
        t = ProgressTracker(plan, clock=clock, min_samples=2, min_sample_s=0.01)
        per_unit = {  # seconds per unit (step or view) of each phase
            LINEAR_PROBE: 8 * teacher_s,
            TEACHER_CACHE: teacher_s,
            DISTILL: 8 * 3 * student_s,
            STUDENT_FINETUNE: 8 * 3 * student_s,
        }
        eta, start_rest = None, 0.0
        for p in [q for q in plan if q.work > 0]:
            t.start(p.name, p.units)
            for done in range(int(p.units) + 1):
                t.update(p.name, done)
                clock.now += per_unit[p.name]
            t.finish(p.name)
            if p.name == LINEAR_PROBE:
                eta, start_rest = t.eta_s(), clock.now
        assert eta is not None
        return eta, clock.now - start_rest - per_unit[TEACHER_CACHE]  # the loop's last tick is not work

    measured = plan_phases(
        cfg, transfer_size=UNLABELED, model_costs={"teacher": teacher_s, "student": student_s}
    )
    eta, really = simulate(measured)
    assert eta == pytest.approx(really, rel=0.1)
    eta_blind, really_blind = simulate(plan_phases(cfg, transfer_size=UNLABELED))
    assert eta_blind > 2 * really_blind  # every pass at the teacher's speed
    # the weights follow the costs too: a distill step weighs a sixth of a teacher step's work
    plan = {p.name: p for p in measured}
    assert plan[LINEAR_PROBE].cost == pytest.approx(6.0) and plan[DISTILL].cost == pytest.approx(3.0)


def test_measure_model_costs_times_both_models_without_reading_weights(small_config, tmp_path) -> None:
    from kt_train.costs import measure_model_costs

    costs = measure_model_costs(_cached_cfg(small_config, tmp_path / "run"))
    assert set(costs) == {"teacher", "student"} and all(0 < v < 1 for v in costs.values())
    bad = _cached_cfg(small_config, tmp_path / "run", student__model="timm:no_such_model_xyz")
    assert set(measure_model_costs(bad)) == {"teacher"}  # an estimate never fails the run


def test_a_cache_that_is_reused_drops_out_without_moving_the_bar_back(small_config, tmp_path) -> None:
    cfg = _cached_cfg(small_config, tmp_path / "run")
    tracker = ProgressTracker(plan_phases(cfg, transfer_size=UNLABELED))
    tracker.mark_done("finetune_teacher")  # an earlier run finished the teacher
    tracker.begin_stage("distill")
    before = tracker.progress()
    assert before > 0.0
    tracker.start(DISTILL, 5)  # no cache build: it was reused
    assert tracker.progress() == before
    tracker.update(DISTILL, 5)
    tracker.finish(DISTILL)
    tracker.end_stage("distill")
    tracker.begin_stage("finetune_student")
    tracker.start(STUDENT_FINETUNE, 4)
    tracker.update(STUDENT_FINETUNE, 4)
    tracker.finish(STUDENT_FINETUNE)
    tracker.end_stage("finetune_student")
    assert tracker.progress() == 1.0
    assert ProgressTracker(floor=0.79).progress() == 0.79  # a resumed job's progress is a floor


def test_eta_is_measured_from_the_smoothed_rate_and_the_work_left() -> None:
    """No ETA before enough samples; then the current phase's units left at its measured rate plus
    the later phases' work at the rate measured for their group, and a slow-down shows at once."""
    clock = FakeClock()
    phases = [
        Phase("cache", 100, 1, 1.0, "teacher forward", unit="view"),
        Phase("distill", 50, 4, 3.0, "student train"),
        Phase("finetune", 10, 4, 3.0, "student train"),
    ]
    t = ProgressTracker(phases, clock=clock, min_samples=3, min_sample_s=1.0)
    t.start("cache", 100)
    for done in range(0, 31, 10):  # 10 views/s; the first update only sets the baseline
        t.update("cache", done)
        assert t.eta_s() is None if done < 30 else t.eta_s() is not None
        clock.now += 1.0
    # 70 views at 10/s; distill + finetune (720 passes) at the last measured rate (10 passes/s)
    assert t.eta_s() == pytest.approx(7.0 + 72.0)
    assert t.phase_eta_s() == pytest.approx(7.0)
    for done in range(40, 101, 10):
        t.update("cache", done)
        clock.now += 1.0
    t.finish("cache")
    t.start("distill", 50)
    t.update("distill", 0)
    for step in range(1, 5):  # 1 step/s = 12 passes/s
        clock.now += 1.0
        t.update("distill", step)
    assert t.eta_s() == pytest.approx((46 + 10) * 12 / 12)  # finetune measured by distill's group
    for step in range(5, 8):  # 4x slower: the EWMA moves towards it, the average would not
        clock.now += 4.0
        t.update("distill", step)
    rate = t.phase_rate()
    assert rate is not None and 0.25 < rate < 0.7
    assert t.eta_s() == pytest.approx((50 - 7) / rate + 10 * 12 / (rate * 12))
    for step in range(8, 20):  # the EWMA forgets the fast start
        clock.now += 4.0
        t.update("distill", step)
    assert t.phase_rate() == pytest.approx(0.25, rel=0.1)
    assert t.eta_s() == pytest.approx((50 - 19 + 10) / 0.25, rel=0.1)
    assert format_duration(408) == "6m48s" and format_duration(13) == "13s"
    assert format_duration(3725) == "1h02m" and format_duration(None) == "?"


def test_line_reporter_prints_a_line_every_interval() -> None:
    clock = FakeClock()
    out = io.StringIO()
    tracker = ProgressTracker([Phase(DISTILL, 100, 32, 3.0, "student train")], clock=clock)
    rep = LineReporter(tracker, stream=out, interval_s=30.0, clock=clock)
    rep.start(DISTILL, 100)
    for step in range(1, 101):
        clock.now += 1.0
        rep.update(DISTILL, step, {"kd": 0.5})
    rep.finish(DISTILL)
    lines = out.getvalue().splitlines()
    assert lines[0] == "distill: started, 100 steps"
    periodic = [line for line in lines if line.startswith("distill: step")]
    assert len(periodic) == 3  # at 30, 60 and 90 s
    assert periodic[0] == "distill: step 30/100 (30%), 32 img/s, ETA 1m10s [kd=0.5]"
    assert lines[-1] == "distill: done, 100 steps in 1m40s"


# --------------------------------------------------------------------------- with the pipeline


def test_the_pipelines_reports_follow_the_plan(small_config, tmp_path) -> None:
    """The real stages report under the planned phase names (no phase is added on the way), the
    cache build moves the progress, and a second run (everything done) starts at 1.0."""
    from kt_train.pipeline import run_pipeline

    cfg = _cached_cfg(small_config, tmp_path / "run")
    tracker = ProgressTracker(plan_phases(cfg))
    rec = Recorder(tracker)
    run_pipeline(cfg, reporter=rec)
    assert [p.name for p in tracker.phases] == [LINEAR_PROBE, TEACHER_CACHE, DISTILL, STUDENT_FINETUNE]
    started = [task for event, task, _ in rec.events if event == "start"]
    assert started == [LINEAR_PROBE, TEACHER_CACHE, DISTILL, STUDENT_FINETUNE]
    progress = [p for _, _, p in rec.events]
    assert _monotonic(progress) and progress[-1] == 1.0
    cache = [p for _, task, p in rec.events if task == TEACHER_CACHE]
    assert cache[-1] - cache[0] > 0.05 and len(set(cache)) >= 4  # 96 views in batches of 16

    again = Recorder(ProgressTracker(plan_phases(cfg)))
    run_pipeline(cfg, reporter=again)
    assert [e for e in again.events if e[0] in ("start", "update")] == []
    assert again.events[-1][2] == 1.0


def test_kt_train_prints_progress_lines_when_its_output_is_not_a_terminal(
    tmp_path: Path, small_config, subprocess_env: dict[str, str]
) -> None:
    kt = VENV_BIN / "kt"
    assert kt.exists(), f"{kt} missing: install the package (pip install -e .)"
    cfg = small_config(
        tmp_path / "run",
        stages=["finetune_teacher", "distill", "finetune_student"],
        distill__steps=30,
        distill__cache={"mode": "cached", "views": 2, "batch_size": 8},
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = subprocess.run(
        [str(kt), "train", "-c", str(path)],
        env={**subprocess_env, "KT_PROGRESS_INTERVAL": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    distill = re.findall(
        r"^distill: step (\d+)/30 \((\d+)%\), (\d+) img/s, ETA (\d+s|\d+m\d\ds); run (\d+)%, ETA \d",
        out,
        re.M,
    )
    assert len(distill) >= 10, out[-4000:]
    steps = [int(m[0]) for m in distill]
    assert steps == sorted(steps) and steps[-1] == 30
    assert all(int(m[2]) > 0 for m in distill)
    assert re.search(r"^teacher cache: view \d+/96 \(\d+%\)", out, re.M), out[-4000:]
    runs = [int(m) for m in re.findall(r"; run (\d+)%", out)]
    assert runs == sorted(runs) and runs[-1] >= 99
    for task in (LINEAR_PROBE, TEACHER_CACHE, DISTILL, STUDENT_FINETUNE):
        assert f"{task}: started" in out and f"{task}: done" in out, task


def test_kt_gallery_build_prints_progress_lines_off_a_terminal(
    demo_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "console", Console(stderr=True, width=400))  # CliRunner: not a terminal
    result = CliRunner().invoke(
        cli.app,
        ["gallery", "build", str(demo_data["transfer"]), "-o", str(tmp_path / "g"), "--encoder",
         "timm:test_vit", "--image-size", "32", "--batch-size", "8", "--device", "cpu",
         "--progress-interval", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = re.findall(rf"^embed: image (\d+)/{UNLABELED} \((\d+)%\)", result.stderr, re.M)
    assert [int(d) for d, _ in lines] == list(range(8, UNLABELED + 1, 8))
    assert "embed: started" in result.stderr and "embed: done" in result.stderr

"""The progress a job row shows across attempts (issue 13 item 4): the worker's own progress
writing (``worker.runner.run_job``, ``JobReporter``) with stage functions that report like the real
ones (a teacher probe, a teacher-output cache build, distillation resumed from its checkpoint, a
student finetune) but train nothing, so every value the row takes can be read back."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from kt_train import pipeline
from kt_train.io import is_done, mark_done, read_outputs
from tests.worker.conftest import add_job, get_job
from worker import runner

STAGES = ["finetune_teacher", "distill", "finetune_student"]


def test_a_resumed_job_starts_from_the_stages_already_done_and_never_drops(
    session_factory, worker_settings, tenant_id, job_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = add_job(
        session_factory, tenant_id, job_config(stages=STAGES, distill__steps=10, finetune_student__steps=2)
    )
    seen: list[tuple[int, str, float]] = []  # (attempt, where, the row's progress)

    def note(where: str) -> None:
        job = get_job(session_factory, job_id)
        seen.append((job.attempts, where, job.progress))

    def teacher(cfg: Any, inputs: Any, out_dir: Path, reporter: Any = None) -> dict[str, Any]:
        note("teacher begins")  # the row as begin_stage left it
        if is_done(out_dir):
            return read_outputs(out_dir)
        reporter.start("teacher linear probe", 4)
        for step in range(1, 5):
            reporter.update("teacher linear probe", step, {})
            note("probe")
        reporter.finish("teacher linear probe")
        return mark_done(out_dir, {"checkpoint": str(out_dir / "teacher.pt"), "classes": ["a", "b"]})

    def distill(cfg: Any, inputs: Any, out_dir: Path, reporter: Any = None) -> dict[str, Any]:
        note("distill begins")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "cache").exists():  # the first attempt builds the cache; the second reuses it
            reporter.start("teacher cache", 64)
            for views in range(16, 65, 16):
                reporter.update("teacher cache", views, {})
                note("cache")
            reporter.finish("teacher cache")
            (out / "cache").touch()
        saved = int((out / "last.ckpt").read_text()) if (out / "last.ckpt").exists() else 0
        reporter.start("distill", 10)
        if saved:  # as train_loop reports a resumed loop
            reporter.update("distill", saved, {})
            note("distill resumed")
        for step in range(saved + 1, 11):
            reporter.update("distill", step, {"kd": 1.0})
            note("distill")
            if step == 4:
                (out / "last.ckpt").write_text("4")
            if step == 7 and not (out / "crashed").exists():  # two steps past the checkpoint
                (out / "crashed").touch()
                raise RuntimeError("the worker's machine went away")
        reporter.finish("distill")
        return mark_done(out, {"checkpoint": str(out / "student.pt"), "classes": ["a", "b"]})

    def student(cfg: Any, inputs: Any, out_dir: Path, reporter: Any = None) -> dict[str, Any]:
        note("student begins")
        reporter.start("student finetune", 2)
        for step in (1, 2):
            reporter.update("student finetune", step, {})
            note("student")
        reporter.finish("student finetune")
        return mark_done(out_dir, {"checkpoint": str(Path(out_dir) / "student.pt"), "classes": ["a", "b"]})

    for name, fn in (("finetune_teacher", teacher), ("distill", distill), ("finetune_student", student)):
        monkeypatch.setitem(pipeline.STAGE_FUNCS, name, fn)

    with pytest.raises(runner.JobRetry):
        runner.run_job(session_factory, job_id, worker_settings, can_retry=True, progress_interval_s=0)
    first = [p for attempt, _, p in seen if attempt == 1]
    assert first[0] == 0.0 and all(b >= a for a, b in pairwise(first)), first
    cache = [p for attempt, where, p in seen if where == "cache"]
    assert all(b > a for a, b in pairwise(cache)) and cache[-1] - cache[0] > 0.05  # the cache moves it
    crashed_at = get_job(session_factory, job_id).progress
    assert get_job(session_factory, job_id).status == "queued" and crashed_at == first[-1] > 0.3

    assert runner.run_job(session_factory, job_id, worker_settings, progress_interval_s=0) == "succeeded"
    second = [(where, p) for attempt, where, p in seen if attempt == 2]
    values = [p for _, p in second]
    # from the first write on, no lower than where the crashed attempt got to, and never down
    assert second[0][0] == "teacher begins" and values[0] >= crashed_at, second
    assert all(p >= crashed_at for p in values) and all(b >= a for a, b in pairwise(values)), second
    # the resumed distillation (step 4 of 10) picks up at once, and the steps after it move the bar
    resumed = [p for where, p in second if where in ("distill resumed", "distill")]
    assert resumed[-1] > crashed_at
    assert get_job(session_factory, job_id).progress == 1.0

"""What a pass of each model costs on this machine: the seconds per image of one forward pass of the
run's teacher and student at their input sizes, measured in a second or two before the run starts.

The ETA of a job needs it (``kt_train.progress``): the first hour of a service job runs the teacher
(finetune, curation, the teacher-output cache), the longest stage runs the student, and a teacher
pass costs several student passes (the proxy MobileNetV2 teacher at 96 px ~6x the
mobilenetv3_small_050 student on 2 cores). Without it the ETA at the start of a job was 5h26m
for a job that took an hour.

The copies measured are random-init (no weights read: the cost of a pass does not depend on the
weights) and run with the process's own thread count, so the measurement is of the speed the run
will see.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from .models import ModelRecipe, build_model

log = logging.getLogger(__name__)


def forward_seconds_per_image(
    recipe: ModelRecipe, image_size: int | None, *, batch: int = 8, reps: int = 2
) -> float:
    """Seconds per image of a forward pass of ``recipe``'s model (random init) at ``image_size``:
    the fastest of ``reps`` timed batches after one warm-up batch."""
    model = build_model(recipe, load_weights=False, image_size=image_size).eval()
    side = int(model.data_config.input_size)
    x = torch.rand(batch, 3, side, side)
    best = float("inf")
    with torch.inference_mode():
        model(x)
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return best / batch


def measure_model_costs(cfg: Any, *, batch: int = 8, reps: int = 2) -> dict[str, float]:
    """``{"teacher": s, "student": s}``: seconds per image of each model's forward pass at the
    run's input sizes (``image_size: auto`` resolved from the labeled images where it can be; the
    model's default size otherwise). A model that cannot be built here is left out (its passes
    then weigh as much as the other's); this never raises."""
    from .pipeline import resolve_sizes

    with contextlib.suppress(Exception):  # an estimate: the stages report the real error
        cfg = resolve_sizes(cfg)
    out: dict[str, float] = {}
    for role, mc in (("teacher", cfg.teacher), ("student", cfg.student)):
        size = mc.image_size if isinstance(mc.image_size, int) else None
        recipe = ModelRecipe(
            spec=str(mc.model),
            num_classes=2,
            role=role,
            head=getattr(mc, "head", "linear"),
            model_kwargs=dict(getattr(mc, "model_kwargs", None) or {}),
        )
        try:
            out[role] = forward_seconds_per_image(recipe, size, batch=batch, reps=reps)
        except Exception as e:  # an estimate only; the stage that builds the model reports
            log.warning(
                "cost of a %s pass not measured (%s): the ETA weighs its passes as the other's", role, e
            )
    if out:
        log.info("seconds per image of a forward pass: %s", {k: f"{v:.2e}" for k, v in out.items()})
    return out

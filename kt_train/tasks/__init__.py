"""The task seam: one module per task family owns what differs between tasks.

A task decides the head it puts on a backbone, the finetune loss, the distillation loss, the
metrics, the dataset format, the augmentation that must move labels with pixels, and what a
prediction is. The retrieval half of the method (embed, gallery, index, curate) and the training
loop's mechanics (optimizer, schedule, checkpoints, the teacher-output cache) do not depend on it.

- ``classification`` — image-level labels (``kt_train.models.ImageClassifier``, top-1); the
  pipeline's stages implement it today.
- ``segmentation`` — per-pixel labels (``kt_train.tasks.segmentation``): image + index-mask pairs,
  a backbone's multi-scale features with a light LR-ASPP decoder, per-pixel distillation, mean IoU.

The next task (detection, depth) is a new module beside these, registered in ``TASKS``.
"""

from __future__ import annotations

TASKS: tuple[str, ...] = ("classification", "segmentation")
DEFAULT_TASK = "classification"


def check_task(task: str) -> str:
    """``task`` if it is known, else a ``ConfigError`` naming the known ones."""
    from ..errors import ConfigError

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return task

"""The transfer recipe: the hyperparameters ``bench/quality`` chose on val_tune, by budget.

One source for the benchmark (``bench/quality/config.yaml`` names a budget) and the service (a
job names a budget; its per-job knobs override single keys). A recipe is a nested dict of
``TrainConfig`` keys (the input sizes, ``auto``, but not the models, data or stages, which belong
to the task)::

    from kt_train.recipe import recipe, merge
    cfg = parse_config(merge(recipe("balanced"), {"teacher": {...}, "student": {...}, "data": {...}}))

The budgets differ in how long the student learns from the teacher (distillation steps and the
cached views per image), which is where the accuracy comes from (``bench/quality/FINDINGS.md``:
patience); everything else is the same recipe. Pure Python (no torch): the API imports it.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

Budget = Literal["fast", "balanced", "best"]
BUDGETS: tuple[str, ...] = ("fast", "balanced", "best")
DEFAULT_BUDGET: Budget = "balanced"

_AUGMENT = {"scale_min": 0.35, "vflip": True}

# The recipe of the "balanced" budget (bench/quality/FINDINGS.md says why each value).
_BASE: dict[str, Any] = {
    # sizes follow the labeled images (kt_train.sizing): 96 / 96 px on 64 px EuroSAT tiles
    "teacher": {"image_size": "auto"},
    "student": {"image_size": "auto"},
    "finetune_teacher": {
        "linear_probe": {
            "steps": 100,
            "batch_size": 64,
            "lr": 0.01,
            "weight_decay": 0.0,
            "augment": _AUGMENT,
        },
        "full_finetune": {
            "steps": 150,
            "batch_size": 32,
            "lr": 3e-4,
            "weight_decay": 0.05,
            "warmup_steps": 10,
            "augment": _AUGMENT,
        },
    },
    "distill": {
        # patience (FINDINGS.md round 5): 8,000 steps beat 4,000 on val_tune (A5 83.3 vs 82.4, 2 seeds)
        "steps": 8000,
        "batch_size": 64,
        "lr": 3e-3,
        "warmup_steps": 100,
        "temperature": 4.0,
        "ce_weight": 0.0,
        "augment": {"scale_min": 0.25, "vflip": True},
        # views sized to the schedule: each stored view replayed ~4 times, at most 16 per image
        # (kt_train.config): 16 views for the 2,600 unlabeled EuroSAT images and for a 5,000-item set;
        # 7 views (replays 16) cost A4 5 points on val_tune (FINDINGS.md)
        "cache": {"mode": "auto", "views": 16, "replays": 4},
    },
    "finetune_student": {
        "steps": 200,
        "batch_size": 32,
        "lr": 3e-4,
        "scratch_lr": 0.01,
        "warmup_steps": 10,
        "augment": _AUGMENT,
        # after a long task distillation on an in-domain transfer set the finetune on the labeled
        # images lost val_tune points at every lr tried, on an out-of-domain one it gained 17 (A3,
        # FINDINGS.md). "auto" (a per-job check on held-out labels) is built and tested, but becomes
        # the default only once bench/quality has measured it on A3/A4/A5
        "after_distillation": False,
    },
    "curate": {
        "crops": 0,
        "k_per_crop": 300,
        "dedup_threshold": 0.995,
        "leakage_threshold": 0.998,
        "teacher_filter": True,
        # a floor on the teacher's confidence: a query whose gallery neighbours the teacher does not
        # confidently call the query's class leaves its quota unfilled (the set is then smaller than
        # asked) instead of filling it with out-of-domain images (FINDINGS.md: A5 at 5,000)
        "teacher_min_prob": 0.5,
        "teacher_rerank": 1.0,
    },
}

# What each budget changes relative to the balanced recipe.
_BUDGET_OVERRIDES: dict[str, dict[str, Any]] = {
    "fast": {"distill": {"steps": 1000, "warmup_steps": 50, "cache": {"views": 8}}},
    "balanced": {},
    "best": {"distill": {"steps": 16000, "warmup_steps": 200, "cache": {"views": 32, "replays": 8}}},
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` applied key by key (nested dicts merged, other values replaced);
    neither argument is modified. ``None`` values in ``override`` are skipped (unset knobs)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def recipe(budget: str = DEFAULT_BUDGET) -> dict[str, Any]:
    """The recipe's ``TrainConfig`` keys for ``budget`` (a fresh dict the caller may change)."""
    if budget not in _BUDGET_OVERRIDES:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    return merge(_BASE, _BUDGET_OVERRIDES[budget])

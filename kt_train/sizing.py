"""Input sizes that follow the data (``image_size: auto``).

A fixed size suits one kind of data: the 64 px that fits EuroSAT tiles wastes 200x150 photos, and
224 px blows 32 px CIFAR images up 7x for no information. ``auto`` reads the labeled images'
shorter sides and picks:

- the data's side: the median shorter side rounded to a multiple of 32, clamped to 64..224;
- teacher: 1.5x that side rounded to 32, at most 336 — the teacher is run once per cached view,
  and on EuroSAT the 96 px teacher beat the 64 px one by 4-5 points on val_tune;
- student: the teacher's side, at most 224 (past 224 a small student on CPU gets slow). A
  stride-32 student on 64 px input ends in a 2x2 map: at 96 px the same student, distilled for
  the same 4,000 steps, scored 82.7 on EuroSAT's val_tune against 79.2 at 64 px (2 seeds, teacher
  82.75; bench/quality/FINDINGS.md), for 1.7x the cost of a step.

Both models still see the same augmented view (rendered at the larger side and resized).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

STUDENT_RANGE = (64, 224)
TEACHER_MAX = 336
TEACHER_SCALE = 1.5
SAMPLE = 64  # images whose sizes are read (evenly spaced over the set)


def _round32(x: float) -> int:
    return max(32, math.floor(x / 32.0 + 0.5) * 32)  # half up (round() is half-to-even)


def auto_sizes(shorter_sides: Sequence[int]) -> tuple[int, int]:
    """``(teacher_side, student_side)`` for images with these shorter sides."""
    if not shorter_sides:
        raise ValueError("auto image size needs at least one readable image")
    med = statistics.median(shorter_sides)
    lo, hi = STUDENT_RANGE
    native = min(hi, max(lo, _round32(med)))
    teacher = min(TEACHER_MAX, max(native, _round32(TEACHER_SCALE * native)))
    return teacher, min(hi, teacher)


def sample_indices(n: int, k: int = SAMPLE) -> list[int]:
    """Up to ``k`` evenly spaced indices of ``range(n)`` (deterministic: every stage agrees)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})

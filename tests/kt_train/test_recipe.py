"""The default recipe (budgets), input sizes that follow the data, and thread sizing."""

from __future__ import annotations

from pathlib import Path

import pytest

from kt_train import pipeline
from kt_train.config import parse_config
from kt_train.errors import ConfigError
from kt_train.recipe import BUDGETS, merge, recipe
from kt_train.sizing import auto_sizes, sample_indices
from kt_train.threads import thread_count

from ._images import make_imagefolder, write_image


@pytest.mark.parametrize("budget", BUDGETS)
def test_every_budget_is_a_valid_config(budget: str) -> None:
    cfg = parse_config(merge(recipe(budget), {"teacher": {"model": "timm:test_vit"}}))
    assert cfg.distill.steps > 0
    assert cfg.teacher.image_size == "auto" and cfg.student.image_size == "auto"


def test_budgets_grow_the_transfer_schedule() -> None:
    steps = [recipe(b)["distill"]["steps"] for b in ("fast", "balanced", "best")]
    views = [recipe(b)["distill"]["cache"]["views"] for b in ("fast", "balanced", "best")]
    assert steps == sorted(steps) and len(set(steps)) == 3
    assert views == sorted(views)
    # everything but the schedule is one recipe
    fast, best = recipe("fast"), recipe("best")
    assert fast["finetune_teacher"] == best["finetune_teacher"]
    assert fast["distill"]["temperature"] == best["distill"]["temperature"]


def test_unknown_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="fast, balanced, best"):
        recipe("huge")


def test_merge_is_deep_and_skips_unset_values() -> None:
    base = recipe()
    out = merge(base, {"distill": {"steps": 7, "lr": None, "cache": {"views": 3}}})
    assert out["distill"]["steps"] == 7
    assert out["distill"]["lr"] == base["distill"]["lr"]
    assert out["distill"]["cache"] == {**base["distill"]["cache"], "views": 3}
    assert base["distill"]["steps"] != 7  # inputs untouched
    assert recipe()["distill"]["steps"] == base["distill"]["steps"]


@pytest.mark.parametrize(
    ("sides", "expected"),
    [
        ([64] * 5, (96, 96)),  # EuroSAT tiles: the sizes tuned on val_tune
        ([32] * 5, (96, 96)),  # CIFAR: not below the floor
        ([150, 150, 140], (256, 224)),  # 200x150 photos: 1.5 x 160 = 240 -> 256; the student at most 224
        ([480, 360, 720], (336, 224)),  # large photos: clamped
    ],
)
def test_auto_sizes(sides: list[int], expected: tuple[int, int]) -> None:
    assert auto_sizes(sides) == expected


def test_auto_sizes_needs_images() -> None:
    with pytest.raises(ValueError):
        auto_sizes([])


def test_sample_indices_are_spread_and_deterministic() -> None:
    idx = sample_indices(1000, 8)
    assert idx[0] == 0 and idx[-1] == 999 and len(idx) == 8
    assert idx == sample_indices(1000, 8)
    assert sample_indices(3, 8) == [0, 1, 2]


def test_resolve_sizes_follows_the_labeled_images(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for c in ("a", "b"):
        for k in range(3):
            write_image(root / c / f"{c}{k}.png", width=200, height=150, seed=k)
    cfg = parse_config(
        {
            "teacher": {"model": "timm:test_vit", "image_size": "auto"},
            "student": {"model": "timm:resnet10t", "image_size": "auto"},
            "data": {"train": {"path": str(root)}},
        }
    )
    out = pipeline.resolve_sizes(cfg)
    assert (out.teacher.image_size, out.student.image_size) == (256, 224)
    assert cfg.teacher.image_size == "auto"  # a copy


def test_explicit_sizes_are_kept(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "d", {"a": 2, "b": 2})
    cfg = parse_config(
        {
            "teacher": {"model": "timm:test_vit", "image_size": 48},
            "student": {"model": "timm:resnet10t", "image_size": "auto"},
            "data": {"train": {"path": str(tmp_path / "d")}},
        }
    )
    out = pipeline.resolve_sizes(cfg)
    assert out.teacher.image_size == 48 and out.student.image_size == 96


def test_auto_without_train_data_is_a_clear_error() -> None:
    cfg = parse_config({"student": {"image_size": "auto"}})
    with pytest.raises(ConfigError, match=r"data\.train"):
        pipeline.resolve_sizes(cfg)


def test_bad_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        parse_config({"student": {"image_size": 4}})
    with pytest.raises(ConfigError, match="image_size"):
        parse_config({"student": {"image_size": "big"}})


def test_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("kt_train.threads.usable_cores", lambda: 8)
    assert thread_count() == 8
    assert thread_count(processes=3) == 2
    assert thread_count(processes=16) == 1
    assert thread_count(5, processes=4) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the process was started with one thread: kept
    assert thread_count(processes=1) == 1
    monkeypatch.setenv("KT_THREADS", "3")  # KT_THREADS wins
    assert thread_count(processes=4) == 3
    monkeypatch.setenv("KT_THREADS", "zero")
    with pytest.raises(ValueError, match="KT_THREADS"):
        thread_count()


def test_cache_views_follow_the_schedule() -> None:
    from kt_train.pipeline import cache_views

    def dc(steps: int, views: int, replays: int | None) -> object:
        return parse_config(
            {"distill": {"steps": steps, "batch_size": 64, "cache": {"views": views, "replays": replays}}}
        ).distill

    assert cache_views(dc(4000, 16, None), 2600) == 16  # fixed count without replays
    assert cache_views(dc(4000, 16, 16), 2600) == 7  # ceil(256000 / 41600)
    assert cache_views(dc(4000, 16, 16), 5000) == 4
    assert cache_views(dc(100, 16, 16), 5000) == 1  # at least one view
    assert cache_views(dc(100000, 16, 16), 100) == 16  # at most `views`

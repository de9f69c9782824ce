"""The teacher-output cache: exact view replay, top-k targets, keys, resume, and the distill stage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kt_train import cache_store, pipeline, teacher_cache
from kt_train.config import parse_config
from kt_train.data import load_unlabeled
from kt_train.errors import ConfigError
from kt_train.losses import kd_loss
from kt_train.models import load_checkpoint
from kt_train.teacher_cache import (
    CachedViews,
    TeacherCache,
    build_teacher_cache,
    cache_key,
    kd_loss_topk,
    open_or_build,
    pack_params,
    unpack_params,
)
from kt_train.transforms import TrainAugment

from ..conftest import UNLABELED, small_config_dict
from ._images import random_image, write_image


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, demo_data: dict[str, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tc_teacher")
    cfg = parse_config(small_config_dict(demo_data, root))
    out = pipeline.finetune_teacher(cfg, {}, root / "finetune_teacher")
    return {"checkpoint": out["checkpoint"], "classes": out["classes"]}


def _images(demo_data: dict[str, Path]):
    ds = load_unlabeled(demo_data["transfer"])
    ds.cache_in_memory()
    return ds


def _model(teacher: dict[str, Any]):
    model, _ = load_checkpoint(teacher["checkpoint"])
    return model.eval()


AUG = TrainAugment(32, scale=(0.2, 1.0), vflip=True, color_jitter=0.4)


def test_params_pack_roundtrip_renders_the_same_view() -> None:
    img = random_image(40, 30, seed=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = AUG.sample_params(img.width, img.height, g)
        q = unpack_params(pack_params(p))
        assert {k: q[k] for k in ("top", "left", "h", "w", "hflip", "vflip", "jitter_order")} == {
            k: p[k] for k in ("top", "left", "h", "w", "hflip", "vflip", "jitter_order")
        }
        for op in ("brightness", "contrast", "saturation"):
            assert q[op] == pytest.approx(p[op], rel=1e-6)
        assert unpack_params(pack_params(q)) == q  # float32-rounded params are a fixed point
    plain = TrainAugment(32)
    p = plain.sample_params(40, 30, g)
    assert "jitter_order" not in unpack_params(pack_params(p))


def test_topk_loss_equals_full_kd_when_k_covers_all_classes() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    vals, idx = t.topk(5, dim=-1)
    assert kd_loss_topk(s, vals, idx, 4.0).item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-5)
    # with k < C: finite, non-negative, zero when the student matches the teacher's top-k exactly
    vals3, idx3 = t.topk(3, dim=-1)
    assert kd_loss_topk(s, vals3, idx3, 2.0).item() >= 0
    match = torch.full((6, 5), -1e4).scatter(1, idx3, vals3)
    assert kd_loss_topk(match, vals3, idx3, 2.0).item() == pytest.approx(0.0, abs=1e-5)


def test_replayed_views_reproduce_the_teachers_stored_logits(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    ds, model = _images(demo_data), _model(teacher)
    cache = build_teacher_cache(
        model,
        ds,
        AUG,
        tmp_path / "c",
        views=3,
        topk=3,
        seed=7,
        num_classes=len(teacher["classes"]),
        batch_size=16,
    )
    assert (cache.num_items, cache.views, cache.topk) == (UNLABELED, 3, 3)
    assert cache.logits.dtype == np.float16 and cache.indices.dtype == np.int16
    assert bool(np.asarray(cache.valid).all())
    views = CachedViews(ds, AUG, cache)
    assert len(views) == UNLABELED * 3
    rows = [0, 1, 2, 5, 77, len(views) - 1]
    x = torch.stack([views[j][0] for j in rows])
    with torch.no_grad():
        live = model(x.contiguous(memory_format=torch.channels_last)).float()
    for n, j in enumerate(rows):
        _, vals, idx, jj = views[j]
        assert jj == j
        assert torch.equal(idx, live[n].topk(3).indices)
        torch.testing.assert_close(vals.float(), live[n].topk(3).values, atol=2e-2, rtol=2e-3)
    # views differ between rows of one image (the stored crop boxes are distinct draws)
    assert not np.array_equal(cache.params[0, 0], cache.params[0, 1])
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["views"] == 3 and meta["topk"] == 3 and meta["build_views_per_s"] > 0
    assert not (tmp_path / "c.partial").exists()


def test_cache_key_changes_with_what_the_targets_depend_on(
    teacher: dict[str, Any], demo_data: dict[str, Path]
) -> None:
    ds = _images(demo_data)
    base = cache_key("t1", ds, AUG, views=4, topk=5, seed=0)
    assert cache_key("t1", ds, AUG, views=4, topk=5, seed=0) == base
    fewer = load_unlabeled(demo_data["transfer"])
    fewer.items = fewer.items[:-1]
    variants = [
        cache_key("t2", ds, AUG, views=4, topk=5, seed=0),
        cache_key("t1", fewer, AUG, views=4, topk=5, seed=0),
        cache_key(
            "t1",
            ds,
            TrainAugment(32, scale=(0.3, 1.0), vflip=True, color_jitter=0.4),
            views=4,
            topk=5,
            seed=0,
        ),
        cache_key(
            "t1",
            ds,
            TrainAugment(48, scale=(0.2, 1.0), vflip=True, color_jitter=0.4),
            views=4,
            topk=5,
            seed=0,
        ),
        cache_key("t1", ds, AUG, views=5, topk=5, seed=0),
        cache_key("t1", ds, AUG, views=4, topk=6, seed=0),
        cache_key("t1", ds, AUG, views=4, topk=5, seed=1),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_open_or_build_reuses_and_never_loads_the_teacher_again(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    ds, loads = _images(demo_data), []

    def loader():
        loads.append(1)
        return _model(teacher)

    kw = dict(views=2, topk=10, seed=0, num_classes=len(teacher["classes"]), batch_size=32)
    c1, built1 = open_or_build(tmp_path, teacher["checkpoint"], loader, ds, AUG, **kw)
    c2, built2 = open_or_build(tmp_path, teacher["checkpoint"], loader, ds, AUG, **kw)
    assert (built1, built2, len(loads)) == (True, False, 1)
    assert c1.path == c2.path and c1.topk == len(teacher["classes"])  # k capped at the class count
    np.testing.assert_array_equal(c1.logits, c2.logits)
    # another teacher file (same weights, other bytes) -> another cache
    other = tmp_path / "teacher_copy.pt"
    shutil.copy(teacher["checkpoint"], other)
    with open(other, "ab") as f:
        f.write(b"\0")
    _, built3 = open_or_build(tmp_path, other, loader, ds, AUG, **kw)
    assert built3 and len(loads) == 2


def test_a_capped_store_evicts_the_least_recently_used_cache_but_not_one_being_read(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    ds = _images(demo_data)
    kw = dict(topk=10, seed=0, num_classes=len(teacher["classes"]), batch_size=32)
    a, _ = open_or_build(tmp_path, teacher["checkpoint"], lambda: _model(teacher), ds, AUG, views=1, **kw)
    one = cache_store.store_bytes(tmp_path)
    # a is still being read: a second cache past the cap keeps it (the store stays over for now)
    b, _ = open_or_build(
        tmp_path, teacher["checkpoint"], lambda: _model(teacher), ds, AUG, views=2, max_bytes=one + 1, **kw
    )
    assert a.path.is_dir() and b.path.is_dir()
    a.release()
    b.release()
    os.utime(b.path, (1, 1))  # b was used longest ago
    # opening a again (reused, marked used) evicts b, now the least recently used
    a2, built = open_or_build(
        tmp_path, teacher["checkpoint"], lambda: _model(teacher), ds, AUG, views=1, max_bytes=one + 1, **kw
    )
    assert not built and a2.path == a.path and a2.lease is not None and a2.lease.held
    assert not b.path.exists() and cache_store.store_bytes(tmp_path) == one
    a2.release()
    assert not a2.lease.held


def test_killed_build_resumes_and_matches_a_clean_build(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    ds, model = _images(demo_data), _model(teacher)
    kw = dict(views=2, topk=4, seed=1, num_classes=len(teacher["classes"]), batch_size=8)
    clean = build_teacher_cache(model, ds, AUG, tmp_path / "clean", **kw)

    class Dies(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 3:
                raise RuntimeError("worker killed")
            return model(x)

    with pytest.raises(RuntimeError, match="worker killed"):
        build_teacher_cache(Dies(), ds, AUG, tmp_path / "r", flush_every_s=0.0, **kw)
    prog = json.loads((tmp_path / "r.partial" / "progress.json").read_text())
    assert prog["rows_done"] == 24  # three batches of 8 were stored before the crash
    resumed = build_teacher_cache(model, ds, AUG, tmp_path / "r", **kw)
    assert resumed.meta["resumed_from"] == 24
    for name in ("params", "logits", "indices", "valid"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(clean, name), err_msg=name)


def test_unreadable_images_are_left_out_of_the_views(teacher: dict[str, Any], tmp_path: Path) -> None:
    for k in range(6):
        write_image(tmp_path / "imgs" / f"{k}.png", 20, 20, seed=k)
    (tmp_path / "imgs" / "9_bad.png").write_bytes(b"not an image")
    ds = load_unlabeled(tmp_path / "imgs")  # not cached: decoded on the fly, the bad one fails
    cache = build_teacher_cache(
        _model(teacher), ds, AUG, tmp_path / "c", views=2, topk=2, seed=0, num_classes=4, batch_size=4
    )
    assert cache.meta["invalid_views"] == 2
    views = CachedViews(ds, AUG, cache)
    assert len(views) == 12
    assert all(int(views.row_ids[j]) // 2 != 6 for j in range(len(views)))


def test_cached_views_refuse_another_set_or_view_size(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    ds = _images(demo_data)
    cache = build_teacher_cache(
        _model(teacher), ds, AUG, tmp_path / "c", views=1, topk=2, seed=0, num_classes=4, batch_size=64
    )
    fewer = _images(demo_data)
    fewer.items, fewer._cache = fewer.items[:10], fewer._cache[:10]
    with pytest.raises(ConfigError, match="different sets"):
        CachedViews(fewer, AUG, cache)
    with pytest.raises(ConfigError, match="px"):
        CachedViews(ds, TrainAugment(48), cache)
    with pytest.raises(ConfigError, match="not a finished"):
        TeacherCache.open(tmp_path)


def test_distill_stage_cached_mode_builds_once_and_reuses_across_students(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "cache"
    cfg = parse_config(
        small_config_dict(
            demo_data, tmp_path / "a", distill__cache={"mode": "cached", "views": 2, "dir": str(shared)}
        )
    )
    inputs = {"teacher": teacher["checkpoint"], "classes": teacher["classes"]}
    a = pipeline.distill(cfg, dict(inputs), tmp_path / "a" / "distill")
    assert a["teacher_cache"]["built"] is True and a["teacher_cache"]["views"] == 2
    assert a["lineage"]["teacher_outputs"] == "cached"
    hist = json.loads((tmp_path / "a" / "distill" / "history.json").read_text())["distill"]
    assert hist[-1]["step"] == 5 and np.isfinite(hist[-1]["kd"])
    # a second student from the same teacher and set: the cache is reused, the teacher never runs
    calls = []
    real = teacher_cache.build_teacher_cache
    monkeypatch.setattr(
        teacher_cache, "build_teacher_cache", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    cfg_b = parse_config(
        small_config_dict(
            demo_data,
            tmp_path / "b",
            student={"model": "timm:resnet10t", "image_size": 32},
            distill__cache={"mode": "cached", "views": 2, "dir": str(shared)},
        )
    )
    b = pipeline.distill(cfg_b, dict(inputs), tmp_path / "b" / "distill")
    assert b["teacher_cache"]["built"] is False and b["teacher_cache"]["path"] == a["teacher_cache"]["path"]
    assert calls == []
    # the reuse is recorded: nothing spent building, what the first run spent
    assert b["teacher_cache"]["build_seconds"] == 0.0
    assert b["teacher_cache"]["reused_build_seconds"] == a["teacher_cache"]["build_seconds"]
    assert b["teacher_cache"]["key"] == a["teacher_cache"]["key"] == Path(a["teacher_cache"]["path"]).name


def test_auto_mode_picks_the_cache_only_when_it_saves_teacher_passes(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    inputs = {"teacher": teacher["checkpoint"], "classes": teacher["classes"]}
    # 48 images x 8 views = 384 teacher passes vs 5 steps x 8 = 40 online: stays online
    online = pipeline.distill(
        parse_config(small_config_dict(demo_data, tmp_path / "o")), dict(inputs), tmp_path / "o" / "distill"
    )
    assert "teacher_cache" not in online and online["lineage"]["teacher_outputs"] == "online"
    # 48 x 1 = 48 < 10 steps x 8 = 80: cached (default dir under out_dir)
    cached = pipeline.distill(
        parse_config(
            small_config_dict(demo_data, tmp_path / "c", distill__steps=10, distill__cache={"views": 1})
        ),
        dict(inputs),
        tmp_path / "c" / "distill",
    )
    assert cached["teacher_cache"]["built"] is True
    assert Path(cached["teacher_cache"]["path"]).parent == tmp_path / "c" / "teacher_cache"


def test_views_rendered_at_the_students_size_are_the_same_crops(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    ds = _images(demo_data)
    plain = TrainAugment(32, scale=(0.2, 1.0))
    cache = build_teacher_cache(
        _model(teacher), ds, plain, tmp_path / "c", views=2, topk=2, seed=0, num_classes=4, batch_size=64
    )
    full, small = CachedViews(ds, plain, cache), CachedViews(ds, plain, cache, render_size=16)
    for j in (0, 3, 50):
        a, b = full[j][0], small[j][0]
        assert a.shape == (3, 32, 32) and b.shape == (3, 16, 16)
        down = torch.nn.functional.interpolate(a[None].float(), size=16, mode="bilinear", antialias=True)[0]
        assert (down - b.float()).abs().mean() < 12  # the same crop, at another resolution
        other = CachedViews(ds, plain, cache, render_size=16)[j + 1][0]
        assert (down - other.float()).abs().mean() > (down - b.float()).abs().mean()


def test_find_batch_size_doubles_until_out_of_memory() -> None:
    from kt_train.train import find_batch_size

    tried: list[int] = []

    def step(bs: int) -> None:
        tried.append(bs)
        if bs > 200:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    assert find_batch_size(step, start=16, limit=4096) == 128
    assert tried == [16, 32, 64, 128, 256]
    assert find_batch_size(step, start=16, limit=64) == 64
    assert find_batch_size(step, start=24, limit=4096, multiple_of=16) == 192
    with pytest.raises(ConfigError, match="does not fit"):
        find_batch_size(step, start=512)


def test_max_distill_batch_runs_real_steps_on_the_device(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path
) -> None:
    cfg = parse_config(small_config_dict(demo_data, tmp_path))
    assert (
        pipeline.max_distill_batch(cfg, teacher["checkpoint"], limit=64) == 64
    )  # CPU: no OOM below the limit


def test_task_agnostic_cached_features_match_the_live_backbone(
    teacher: dict[str, Any], demo_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task-agnostic distillation replays the backbone's full feature vector per cached view (the
    top-k over every dimension, scattered back) instead of running the backbone in the loop."""
    shared = tmp_path / "cache"
    cfg = parse_config(
        small_config_dict(
            demo_data,
            tmp_path / "a",
            distill__method="task_agnostic",
            distill__feature_source="finetuned",
            distill__cache={"mode": "cached", "views": 2, "dir": str(shared)},
        )
    )
    inputs = {"teacher": teacher["checkpoint"], "classes": teacher["classes"]}
    res = pipeline.distill(cfg, dict(inputs), tmp_path / "a" / "distill")
    info = res["lineage"]["teacher_cache"]
    assert info["built"] is True and info["views"] == 2 and info["features"] == 64  # test_vit's width
    hist = json.loads((tmp_path / "a" / "distill" / "history.json").read_text())["distill"]
    assert hist[-1]["step"] == 5 and np.isfinite(hist[-1]["loss"])
    # the stored vectors are the backbone's features of the stored views
    cache = teacher_cache.TeacherCache.open(info["path"])
    backbone, _ = load_checkpoint(teacher["checkpoint"])
    backbone.head = torch.nn.Identity()
    backbone.eval()
    views = CachedViews(_images(demo_data), pipeline.augment_for(cfg.distill, 32), cache)
    x, vals, idx, _ = views[3]
    with torch.no_grad():
        live = backbone(x[None].contiguous(memory_format=torch.channels_last)).float()[0]
    target = torch.zeros(64).scatter_(0, idx.long(), vals.float())
    torch.testing.assert_close(target, live, atol=2e-2, rtol=2e-3)
    # a second run reuses it: the backbone never runs again
    calls = []
    real = teacher_cache.build_teacher_cache
    monkeypatch.setattr(
        teacher_cache, "build_teacher_cache", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    again = pipeline.distill(cfg.model_copy(update={"seed": 0}), dict(inputs), tmp_path / "b" / "distill")
    assert again["lineage"]["teacher_cache"]["built"] is False and calls == []

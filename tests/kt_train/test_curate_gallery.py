"""Curation against a real (tiny) gallery: the encoder, FAISS search, selection, leakage guard,
manifest, report and the distill stage reading the result; and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kt_train.config import CurateConfig, TrainConfig
from kt_train.curate import curate_transfer_set, read_manifest
from kt_train.data import load_labeled
from kt_train.embed import Encoder
from kt_train.errors import ConfigError, DatasetError
from kt_train.gallery import build_gallery

ENCODER = "timm:test_efficientnet"  # random init: noisy copies of an image stay close (cos > 0.97)
QUERIES_PER_CLASS = 2
VARIANTS = 5


def _noise(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _variant(base: np.ndarray, rng: np.random.Generator, amp: int = 20) -> Image.Image:
    return Image.fromarray(
        np.clip(base.astype(int) + rng.integers(-amp, amp + 1, base.shape), 0, 255).astype(np.uint8)
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Labeled images (2 classes x 2), a gallery holding 5 noisy variants of each labeled image,
    40 unrelated images and one exact copy of a labeled image (a leak)."""
    root = tmp_path_factory.mktemp("curate")
    rng = np.random.default_rng(0)
    bases = {}
    for cls in ("alpha", "beta"):
        for i in range(QUERIES_PER_CLASS):
            b = _noise(rng)
            bases[f"{cls}/{cls}{i}.png"] = b
            p = root / "labeled" / cls / f"{cls}{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(b).save(p)
    g = root / "gallery_images"
    for key, b in bases.items():
        for v in range(VARIANTS):
            p = g / "near" / f"{Path(key).stem}_v{v}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            _variant(b, rng).save(p)
    for j in range(40):
        p = g / "other" / f"o{j}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_noise(rng)).save(p)
    leak_key = next(iter(bases))
    Image.fromarray(bases[leak_key]).save(g / "other" / "leak.png")
    gallery = build_gallery(
        [g], root / "gallery", encoder=ENCODER, image_size=32, shard_size=32, index_kind="flat"
    )
    return {"root": root, "gallery": gallery, "labeled": load_labeled(root / "labeled")}


def _cfg(**kw) -> CurateConfig:
    base = dict(size=12, crops=2, dedup_threshold=None, leakage_threshold=0.999, k_per_crop=30)
    return CurateConfig(**{**base, **kw})


def test_query_balanced_takes_each_querys_own_neighbours_and_never_the_leak(world: dict) -> None:
    ts = curate_transfer_set(world["gallery"], world["labeled"], _cfg())
    rows = ts.rows
    assert len(rows) == 12
    assert len({r["id"] for r in rows}) == 12
    per_query = {q: [r for r in rows if r["query_id"] == q] for q in range(4)}
    assert all(len(v) == 3 for v in per_query.values())
    for q, picked in per_query.items():
        stem = Path(world["labeled"].items[q].key).stem
        assert all(Path(r["key"]).name.startswith(f"{stem}_v") for r in picked), (stem, picked)
        assert [r["rank"] for r in picked] == [0, 1, 2]
        assert all(r["query_label"] == stem.rstrip("0123456789") for r in picked)
    assert not any(r["key"].endswith("leak.png") for r in rows)
    assert ts.summary["leakage_dropped"] >= 1
    assert ts.summary["views_per_query"] == 3


def test_leak_is_selected_when_the_guard_is_off(world: dict) -> None:
    ts = curate_transfer_set(world["gallery"], world["labeled"], _cfg(size=8, leakage_threshold=None))
    assert any(r["key"].endswith("leak.png") for r in ts.rows)


def test_knn_class_balanced_and_random_baselines(world: dict) -> None:
    knn = curate_transfer_set(world["gallery"], world["labeled"], _cfg(method="knn"))
    cb = curate_transfer_set(world["gallery"], world["labeled"], _cfg(method="class_balanced"))
    rnd = curate_transfer_set(world["gallery"], world["labeled"], _cfg(method="random", size=20))
    for ts in (knn, cb, rnd):
        assert len({r["id"] for r in ts.rows}) == len(ts.rows)
    assert len(knn.rows) == 12
    scores = [r["score"] for r in knn.rows]
    assert scores == sorted(scores, reverse=True)
    per_class = cb.summary["per_class"]
    assert per_class == {"alpha": 6, "beta": 6}
    assert len(rnd.rows) == 20
    assert sum(r["key"].startswith("other/") for r in rnd.rows) >= 8  # 40 of 61 gallery items are "other"


def test_dedup_drops_near_copies(world: dict) -> None:
    loose = curate_transfer_set(world["gallery"], world["labeled"], _cfg(size=20, dedup_threshold=0.9))
    assert loose.summary["duplicates_dropped"] > 0
    vecs = world["gallery"].vectors(np.asarray([r["id"] for r in loose.rows]))
    sims = vecs @ vecs.T - np.eye(len(vecs))
    assert sims.max() < 0.9 + 1e-3


def test_gallery_side_crops_become_items_with_boxes(world: dict) -> None:
    ts = curate_transfer_set(world["gallery"], world["labeled"], _cfg(size=30, gallery_crops=2))
    boxed = [r for r in ts.rows if r["box"] is not None]
    assert boxed, "no gallery crop was selected"
    for r in boxed:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32


def test_query_and_gallery_crop_embeddings_are_reused_from_the_cache_dir(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """curate.cache_dir: a second curation of the same labeled images on the same gallery embeds
    nothing (the worker gives it the tenant's store) and selects the same set."""
    store = tmp_path / "embeddings"
    cfg = _cfg(size=30, gallery_crops=2, cache_dir=str(store))
    first = curate_transfer_set(world["gallery"], world["labeled"], cfg)
    assert first.summary["embeddings_built"] == {"queries": True, "gallery_crops": True}
    assert len(list(store.glob("*/vectors.npy"))) == 2
    calls = []
    real = Encoder.encode_images
    monkeypatch.setattr(
        Encoder, "encode_images", lambda self, imgs: calls.append(len(imgs)) or real(self, imgs)
    )
    again = curate_transfer_set(world["gallery"], world["labeled"], cfg)
    assert again.summary["embeddings_built"] == {"queries": False, "gallery_crops": False}
    assert calls == [] and again.rows == first.rows
    # other crops of the queries: another entry (and other hits, so maybe other gallery crops)
    other = curate_transfer_set(
        world["gallery"], world["labeled"], _cfg(size=30, gallery_crops=2, crops=3, cache_dir=str(store))
    )
    assert other.summary["embeddings_built"]["queries"] is True and calls
    assert len(list(store.glob("*/vectors.npy"))) >= 3
    # a cap of one byte keeps only the newest entry (the others were not in use)
    capped = _cfg(size=30, gallery_crops=2, crops=3, cache_dir=str(store), cache_max_bytes=1)
    curate_transfer_set(world["gallery"], world["labeled"], capped)
    assert len(list(store.glob("*/vectors.npy"))) == 1
    without = curate_transfer_set(world["gallery"], world["labeled"], _cfg(size=30, gallery_crops=2))
    assert "embeddings_built" not in without.summary


def test_errors_a_user_can_cause(world: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"larger than gallery .* \(61 items\)"):
        curate_transfer_set(world["gallery"], world["labeled"], _cfg(size=1000))
    other = Encoder.from_spec("timm:test_vit", image_size=32)
    with pytest.raises(DatasetError, match="test_efficientnet"):
        curate_transfer_set(world["gallery"], world["labeled"], _cfg(), encoder=other)
    with pytest.raises(ConfigError, match=r"k must be|k=|larger than"):
        world["gallery"].search(np.zeros((1, world["gallery"].dim), np.float32) + 0.1, 10_000)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError):
        build_gallery([empty], tmp_path / "g", encoder=ENCODER, image_size=32)


class _Result:
    def __init__(self, code: int, output: str) -> None:
        self.returncode, self.stderr = code, output


@pytest.fixture
def run_kt():
    from typer.testing import CliRunner

    from kt_train.cli import app

    def run(*args: str) -> _Result:
        res = CliRunner().invoke(app, list(args))
        return _Result(res.exit_code, res.output + (repr(res.exception) if res.exception else ""))

    return run


def test_kt_curate_then_train_distills_on_the_curated_set(world: dict, tmp_path: Path, run_kt) -> None:
    out = tmp_path / "ts"
    res = run_kt(
        "curate",
        "--gallery",
        str(world["gallery"].path),
        "--labeled",
        str(world["root"] / "labeled"),
        "--size",
        "10",
        "-o",
        str(out),
        "--set",
        "curate.crops=1",
        "--set",
        "curate.dedup_threshold=null",
    )
    assert res.returncode == 0, res.stderr
    for name in ("manifest.jsonl", "manifest.csv", "manifest.parquet", "report.html", "summary.json"):
        assert (out / name).is_file(), name
    rows = read_manifest(out / "manifest.parquet")
    assert len(rows) == 10
    from ..browser import chromium

    with chromium() as driver:  # the report a person opens: the grid is there and its images decode
        driver.get((out / "report.html").as_uri())
        rows_shown = driver.execute_script("return document.querySelectorAll('#grid .query-row').length")
        widths = driver.execute_script(
            "return Array.from(document.querySelectorAll('#grid img')).map(i => i.naturalWidth)"
        )
    assert rows_shown == 4
    assert widths and min(widths) > 0
    # the pipeline: curate as a stage, distill reads its manifest
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "stages": ["finetune_teacher", "curate", "distill"],
        "teacher": {"model": "timm:test_vit", "image_size": 32},
        "student": {"model": "timm:test_efficientnet", "image_size": 32},
        "data": {"train": {"path": str(world["root"] / "labeled")}, "cache_images": False},
        "curate": {
            "gallery": str(world["gallery"].path),
            "size": 8,
            "crops": 1,
            "dedup_threshold": None,
            "teacher_filter": True,
            "formats": ["parquet"],
            "report": False,
        },
        "finetune_teacher": {"linear_probe": {"steps": 2, "batch_size": 4}, "full_finetune": {"steps": 0}},
        "distill": {"steps": 2, "batch_size": 4},
    }
    TrainConfig(**cfg)  # valid
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    res = run_kt("train", "-c", str(path))
    assert res.returncode == 0, res.stderr
    outputs = json.loads((tmp_path / "run" / "distill" / "outputs.json").read_text())
    assert outputs["lineage"]["transfer_set"]["path"].endswith("curate/manifest.parquet")
    assert outputs["lineage"]["transfer_set_size"] <= 8


def test_kt_gallery_build_info_and_clear_errors(world: dict, tmp_path: Path, run_kt) -> None:
    src = world["root"] / "gallery_images" / "near"
    out = tmp_path / "g"
    args = ["gallery", "build", str(src), "-o", str(out), "--encoder", ENCODER, "--image-size", "32"]
    res = run_kt(*args, "--shard-size", "8")
    assert res.returncode == 0, res.stderr
    assert "20 images, 256-d" in res.stderr
    res = run_kt(*args, "--shard-size", "8")  # a finished gallery is reused, nothing re-embedded
    assert res.returncode == 0, res.stderr
    info = run_kt("gallery", "info", str(out))
    assert info.returncode == 0
    doc = json.loads(info.stderr[info.stderr.index("{") :].split("\n}")[0] + "\n}")
    assert doc["count"] == 20 and len(doc["shards"]) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_kt("gallery", "build", str(empty), "-o", str(tmp_path / "g2"), "--encoder", ENCODER)
    assert bad.returncode == 2 and "error:" in bad.stderr
    missing = run_kt("gallery", "info", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a gallery" in " ".join(missing.stderr.split())
    nolabels = run_kt(
        "curate", "--gallery", str(out), "--labeled", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")
    )
    assert nolabels.returncode == 2 and "does not exist" in " ".join(nolabels.stderr.split())

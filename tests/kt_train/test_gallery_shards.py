"""A gallery built by many workers, step by step (``kt_train.gallery_shards``, issue 16 part 1): the
quantizer trained once, shards in any order and twice, the parts merged on disk with the gallery's
ids (gaps of unreadable images mapped away), and the same vectors as a one-process build."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kt_train import gallery_shards as gs
from kt_train import index as ix
from kt_train.errors import DatasetError
from kt_train.gallery import Gallery, build_gallery

from ._images import write_image

ENCODER = "timm:test_resnet"


def make_images(root: Path, n: int, broken: tuple[int, ...] = ()) -> Path:
    for i in range(n):
        path = root / f"img_{i:03d}.png"
        if i in broken:
            path.write_bytes(b"not an image")
        else:
            write_image(path, 24, 20, seed=i)
    return root


def test_shards_in_any_order_and_twice_give_one_gallery_without_duplicate_ids(tmp_path: Path) -> None:
    src = make_images(tmp_path / "src", 60, broken=(7, 31))
    out = tmp_path / "g"
    info = gs.plan_distributed_build(
        src,
        out,
        encoder=ENCODER,
        image_size=32,
        shard_size=20,
        index_kind="ivf_flat",
        batch_size=16,
        device="cpu",
    )
    assert (info["shards"], info["listed"], info["index"], info["complete"]) == (3, 60, "ivf_flat", False)
    assert gs.shards_done(out) == (0, 3)
    with pytest.raises(DatasetError, match="train the quantizer"):
        gs.build_shard(out, 2)
    trained = gs.train_quantizer(out)
    assert trained is not None and gs.train_quantizer(out) == trained  # kept, never retrained
    first = gs.build_shard(out, 2)
    with pytest.raises(DatasetError, match=r"shards \[0, 1\] of 3 are not built"):
        gs.finish_build(out)
    gs.build_shard(out, 0)
    gs.build_shard(out, 1)
    (out / "index" / "parts" / "shard-00002.faiss").unlink()  # killed after embedding, before its index
    again = gs.build_shard(out, 2)  # redelivered: the part again, from the same embeddings
    gs.build_shard(out, 1)  # a duplicate delivery of a finished shard changes nothing
    assert first["count"] == again["count"] == 20 and gs.shards_done(out) == (3, 3)

    g = gs.finish_build(out)
    assert g.count == 58 and g.doc["status"] == "complete"
    assert g.doc["index"]["on_disk"]["id_map"] == {"stride": 20, "offsets": [0, 19, 38]}
    assert not any((out / "index" / "parts").iterdir())
    opened = Gallery.open(out)
    index = opened._sharded_index().shards[0][0]
    assert index.ntotal == 58 and ix.is_memory_mapped(index)
    nlist = int(g.doc["index"]["on_disk"]["plan"]["nlist"])
    _, ids = opened.search(opened.vectors(opened.ids()), 1, nprobe=nlist)
    assert ids[:, 0].tolist() == list(range(58))  # each item finds itself, by its gallery id
    assert [r["id"] for r in opened.metadata()] == list(range(58))
    assert gs.finish_build(out).count == 58  # idempotent

    # the same vectors as the one-process build
    one = build_gallery(
        src, tmp_path / "one", encoder=ENCODER, image_size=32, shard_size=20, index_kind="flat"
    )
    np.testing.assert_allclose(one.vectors(one.ids()), opened.vectors(opened.ids()), atol=2e-3)


def test_shard_tasks_read_only_their_listing_file_and_match_the_one_process_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan writes the listing once (listing/shard-<k>.parquet); the quantizer and the shards
    never list the sources again, and the gallery is the one ``build_gallery`` makes: same ids,
    metadata (tar sidecars' url/caption, crop boxes), skipped images and vectors."""
    import json

    from kt_train import data as kt_data
    from kt_train import gallery as kt_gallery

    from .test_gallery import write_img2dataset_shard

    folder = make_images(tmp_path / "src", 40, broken=(7, 31))
    tar = tmp_path / "shards" / "00000.tar"
    tar.parent.mkdir()
    write_img2dataset_shard(tar, [(f"{i:09d}", (10 * i, 200 - 10 * i, 90)) for i in range(6)])
    crops = tmp_path / "crops"
    for i in range(3):
        write_image(crops / f"c_{i}.png", 30, 26, seed=100 + i)
    manifest = crops / "boxes.jsonl"
    lines = [
        {"path": "c_0.png", "box": [1.5, 2.25, 20.75, 19.5]},
        {"path": str(crops / "c_1.png"), "box": None},
        {"path": "c_2.png", "box": [0, 0, 10, 12]},
        {"path": "broken.png"},  # not an image: skipped by its shard task
    ]
    (crops / "broken.png").write_bytes(b"not an image")
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    sources = [folder, tar, manifest]
    kw = {"encoder": ENCODER, "image_size": 32, "shard_size": 20, "batch_size": 8, "device": "cpu"}

    out = tmp_path / "g"
    info = gs.plan_distributed_build(sources, out, index_kind="ivf_flat", train_size=30, **kw)
    assert (info["shards"], info["listed"]) == (3, 50)
    files = sorted(p.name for p in (out / "listing").iterdir())
    assert files == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    # a lost listing file is written again by planning again; the others are kept
    (out / "listing" / "shard-00001.parquet").unlink()
    kept = (out / "listing" / "shard-00000.parquet").stat().st_mtime_ns
    gs.plan_distributed_build(sources, out, index_kind="ivf_flat", train_size=30, **kw)
    assert (out / "listing" / "shard-00001.parquet").is_file()
    assert (out / "listing" / "shard-00000.parquet").stat().st_mtime_ns == kept

    def no_listing(*_a: object, **_k: object) -> None:
        raise AssertionError("a step after the plan listed the sources")

    for mod, attr in (
        (gs, "_Listing"),
        (kt_gallery, "_Listing"),
        (kt_gallery, "_tar_sidecars"),
        (kt_gallery, "load_unlabeled"),
        (kt_data, "load_unlabeled"),
    ):
        monkeypatch.setattr(mod, attr, no_listing)
    assert gs.train_quantizer(out) is not None
    gs.build_shard(out, 2)
    gs.build_shard(out, 0, num_workers=1)  # the loader's decoding processes
    (out / "listing" / "shard-00001.parquet").unlink()
    with pytest.raises(DatasetError, match="cannot read the listing of shard 1"):
        gs.build_shard(out, 1)
    monkeypatch.undo()
    gs.plan_distributed_build(sources, out, index_kind="ivf_flat", train_size=30, **kw)
    for mod, attr in ((gs, "_Listing"), (kt_gallery, "_Listing"), (kt_gallery, "load_unlabeled")):
        monkeypatch.setattr(mod, attr, no_listing)
    gs.build_shard(out, 1)
    g = gs.finish_build(out)
    monkeypatch.undo()

    one = build_gallery(sources, tmp_path / "one", index_kind="flat", **kw)
    assert g.count == one.count == 47
    assert g.metadata() == one.metadata()

    def skipped(doc: dict) -> list:  # without the addresses of the decoder's BytesIO objects
        return [{**s, "error": re.sub(r"0x[0-9a-f]+", "0x", s["error"])} for s in doc["skipped"]]

    assert skipped(g.doc) == skipped(one.doc) and g.doc["num_skipped"] == one.doc["num_skipped"] == 3
    assert any(s["key"] == "broken.png" for s in g.doc["skipped"])
    rows = {r["key"]: r for r in g.metadata()}
    assert rows["000000002.jpg"]["url"] == "https://example.com/000000002.jpg"
    assert rows["c_0.png"]["box"] == pytest.approx([1.5, 2.25, 20.75, 19.5])
    np.testing.assert_allclose(one.vectors(one.ids()), g.vectors(g.ids()), atol=2e-3)
    assert [s["count"] for s in g.doc["shards"]] == [s["count"] for s in one.doc["shards"]]


def test_a_small_flat_plan_skips_training_and_indexes_per_shard(tmp_path: Path) -> None:
    src = make_images(tmp_path / "src", 12)
    out = tmp_path / "g"
    g = gs.build_gallery_parallel(
        src, out, workers=2, encoder=ENCODER, image_size=32, shard_size=5, index_kind="auto", device="cpu"
    )
    assert (
        g.count == 12
        and len(g.doc["index"]["shards"]) == 3
        and g.doc["index"]["shards"][0]["plan"]["kind"] == "flat"
    )
    assert not (out / "index" / "trained.faiss").exists()
    _, ids = g.search(g.vectors([4, 11]), 1)
    assert ids[:, 0].tolist() == [4, 11]


def test_kt_gallery_build_with_workers_merges_on_disk(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kt_train.cli import app

    src = make_images(tmp_path / "src", 30)
    out = tmp_path / "g"
    args = ["gallery", "build", str(src), "-o", str(out), "--encoder", ENCODER, "--image-size", "32"]
    res = CliRunner().invoke(app, [*args, "--shard-size", "10", "--index", "ivf_flat", "--workers", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "embed: done, 3 shards" in res.output  # the progress counts shards, not images
    g = Gallery.open(out)
    assert g.count == 30 and g.doc["index"]["on_disk"]["path"] == "index/merged.faiss"
    _, ids = g.search(g.vectors([0, 29]), 1, nprobe=64)
    assert ids[:, 0].tolist() == [0, 29]

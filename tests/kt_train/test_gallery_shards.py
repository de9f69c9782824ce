"""A gallery built by many workers, step by step (``kt_train.gallery_shards``, issue 16 part 1): the
quantizer trained once, shards in any order and twice, the parts merged on disk with the gallery's
ids (gaps of unreadable images mapped away), and the same vectors as a one-process build."""

from __future__ import annotations

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
    g = Gallery.open(out)
    assert g.count == 30 and g.doc["index"]["on_disk"]["path"] == "index/merged.faiss"
    _, ids = g.search(g.vectors([0, 29]), 1, nprobe=64)
    assert ids[:, 0].tolist() == [0, 29]

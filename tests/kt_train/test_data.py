from __future__ import annotations

import json
import logging
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kt_train.data as data_mod
from kt_train.data import (
    FolderStore,
    ImageDataset,
    Item,
    TarStore,
    ZipStore,
    is_image_entry,
    load_labeled,
    load_unlabeled,
    parse_brace_pattern,
)
from kt_train.errors import DatasetError
from kt_train.transforms import EvalTransform

from ._images import image_bytes, make_imagefolder, write_image, write_shard, zip_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    make_imagefolder(root, {"Forest": 3, "River": 2, "Highway": 2})
    return root


def _junk(root: Path) -> None:
    """Entries that must never be picked up as images."""
    write_image(root / ".hidden.png")
    write_image(root / "Forest" / ".ipynb_checkpoints" / "x.png")
    write_image(root / ".cache" / "y.png")
    (root / "Forest" / "notes.txt").write_text("not an image")
    (root / "Forest" / "._Forest_0.png").write_bytes(b"appledouble")


# ---------------------------------------------------------------------------- ImageFolder


def test_imagefolder_dir(folder: Path) -> None:
    _junk(folder)
    ds = load_labeled(folder)
    assert ds.classes == ["Forest", "Highway", "River"]
    assert len(ds) == 7
    assert ds.class_counts() == {"Forest": 3, "Highway": 2, "River": 2}
    x, y, i = ds[0]
    assert x.dtype == torch.uint8 and x.shape[0] == 3
    assert (y, i) == (0, 0)
    assert all(not Path(it.key).name.startswith(".") for it in ds.items)


@pytest.mark.parametrize("prefix", ["", "EuroSAT/"])
def test_imagefolder_zip(folder: Path, tmp_path: Path, prefix: str) -> None:
    _junk(folder)
    zpath = zip_folder(folder, tmp_path / "data.zip", prefix)
    with zipfile.ZipFile(zpath, "a") as zf:
        zf.writestr("__MACOSX/" + prefix + "Forest/._Forest_0.png", b"junk")
    ds = load_labeled(zpath)
    assert ds.classes == ["Forest", "Highway", "River"]
    assert len(ds) == 7
    assert isinstance(ds.stores[0], ZipStore)
    assert ds.describe(0) == f"{zpath}:{prefix}Forest/Forest_0.png"
    img = ds.load_image(0)
    assert img.mode == "RGB" and img.size == (16, 18)


def test_fixed_classes_and_unknown_label(folder: Path) -> None:
    ds = load_labeled(folder, classes=["River", "Highway", "Forest", "Desert"])
    assert ds.classes == ["River", "Highway", "Forest", "Desert"]
    assert ds.class_counts() == {"River": 2, "Highway": 2, "Forest": 3, "Desert": 0}
    assert {ds.items[k].label for k in range(len(ds)) if ds.items[k].key.startswith("River/")} == {0}
    with pytest.raises(DatasetError, match="Highway"):
        load_labeled(folder, classes=["Forest", "River"])


def test_empty_class_and_missing_path(folder: Path, tmp_path: Path) -> None:
    (folder / "Empty").mkdir()
    (folder / "Empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"class 'Empty' has no images in .*ds.*add images or remove"):
        load_labeled(folder)
    with pytest.raises(DatasetError, match="nope"):
        load_labeled(tmp_path / "nope")
    with pytest.raises(DatasetError, match="nope"):
        load_unlabeled(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_labeled(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no images"):
        load_unlabeled(tmp_path / "empty")


# ---------------------------------------------------------------------------- splits


def test_split_order_and_missing(folder: Path, tmp_path: Path) -> None:
    split = tmp_path / "val.txt"
    split.write_text(
        "# validation\nRiver/River_1.jpg\n\nForest/Forest_0.png,Forest\n./Highway/Highway_0.png\n"
    )
    ds = load_labeled(folder, split=split)
    assert [it.key for it in ds.items] == [
        "River/River_1.jpg",
        "Forest/Forest_0.png",
        "Highway/Highway_0.png",
    ]
    assert [it.label for it in ds.items] == [2, 0, 1]
    assert ds.classes == ["Forest", "Highway", "River"]

    bad = tmp_path / "bad.txt"
    bad.write_text("River/River_1.jpg\nRiver/nope_1.jpg\nRiver/nope_2.jpg\n")
    with pytest.raises(DatasetError, match=r"2 entries of split file .*bad.txt.*nope_1"):
        load_labeled(folder, split=bad)


def test_split_on_wrapped_zip_and_unlabeled(folder: Path, tmp_path: Path) -> None:
    zpath = zip_folder(folder, tmp_path / "wrapped.zip", "EuroSAT/")
    split = tmp_path / "s.txt"
    split.write_text("Highway/Highway_1.jpg\nEuroSAT/Forest/Forest_2.png\n")
    ds = load_labeled(zpath, split=split)
    assert [it.key for it in ds.items] == ["EuroSAT/Highway/Highway_1.jpg", "EuroSAT/Forest/Forest_2.png"]

    un = load_unlabeled(zpath)  # an ImageFolder zip loaded unlabeled: labels stay -1
    assert len(un) == 7 and {it.label for it in un.items} == {-1} and un.classes is None
    split.write_text("EuroSAT/River/River_0.png\n")
    assert [it.key for it in load_unlabeled(zpath, split=split).items] == ["EuroSAT/River/River_0.png"]


# ---------------------------------------------------------------------------- manifests


def test_csv_manifest_with_boxes(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", 40, 30)
    write_image(tmp_path / "imgs" / "b.jpg", 32, 32, seed=1)
    abs_c = write_image(tmp_path / "elsewhere" / "c.png", 20, 20, seed=2)
    (tmp_path / "m.csv").write_text(
        f"path,label,x0,y0,x1,y1\nimgs/a.png,cat,2,3,12,23\nimgs/b.jpg,dog,,,,\n{abs_c},cat,0,0,100,100\n"
    )
    ds = load_labeled(tmp_path / "m.csv")
    assert ds.classes == ["cat", "dog"]
    assert [it.label for it in ds.items] == [0, 1, 0]
    assert ds.items[0].box == (2.0, 3.0, 12.0, 23.0) and ds.items[1].box is None
    assert ds.load_image(0).size == (10, 20)  # the box really crops
    assert ds.load_image(1).size == (32, 32)
    assert ds.load_image(2).size == (20, 20)  # box clamped to the image
    x, _, _ = ds[0]
    assert tuple(x.shape) == (3, 20, 10)


def test_jsonl_manifest_root_and_split(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image(data / "x" / "1.png", 30, 30)
    write_image(data / "x" / "2.png", 30, 30, seed=3)
    man = tmp_path / "meta" / "train.jsonl"
    man.parent.mkdir()
    man.write_text(
        json.dumps({"path": "x/1.png", "label": "b", "box": [5, 5, 15, 25]})
        + "\n\n"
        + json.dumps({"path": "x/2.png", "label": "a", "box": None})
        + "\n"
    )
    ds = load_labeled(man, root=data)
    assert ds.classes == ["a", "b"]
    assert ds.load_image(0).size == (10, 20)
    split = tmp_path / "split.txt"
    split.write_text("x/2.png\n")
    assert [it.key for it in load_labeled(man, root=data, split=split).items] == ["x/2.png"]
    un = load_unlabeled(man, root=data)
    assert [it.label for it in un.items] == [-1, -1] and un.items[0].box == (5.0, 5.0, 15.0, 25.0)

    with pytest.raises(DatasetError, match=r"do not exist.*1\.png"):
        load_labeled(man)  # relative to the manifest's own directory: missing
    man.write_text(json.dumps({"path": "x/1.png", "label": "a", "box": [5, 5, 1, 25]}) + "\n")
    with pytest.raises(DatasetError, match=r"train.jsonl:1: invalid box"):
        load_labeled(man, root=data)


def test_manifest_header_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("file,label\na.png,cat\n")
    with pytest.raises(DatasetError, match="'path' column"):
        load_labeled(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("path\na.png\n")
    with pytest.raises(DatasetError, match="'label' column"):
        load_labeled(tmp_path / "n.csv")
    assert len(load_unlabeled(tmp_path / "n.csv")) == 1


# ---------------------------------------------------------------------------- tar shards


def test_brace_pattern() -> None:
    assert parse_brace_pattern("s-{00000..00002}.tar") == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert parse_brace_pattern("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert parse_brace_pattern("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert parse_brace_pattern("plain.tar") == ["plain.tar"]
    with pytest.raises(DatasetError):
        parse_brace_pattern("s-{5..1}.tar")


def test_tar_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "s-00000.tar", ["000000000", "000000001", "000000002"])
    write_shard(shards / "s-00001.tar", ["000010000", "000010001"], seed=10)

    ds = load_unlabeled(str(shards / "s-{00000..00001}.tar"))
    assert len(ds.stores) == 2 and all(isinstance(s, TarStore) for s in ds.stores)
    assert [it.key for it in ds.items][:4] == [
        "000000000.jpg",
        "000000001.jpg",
        "000000002.jpg",
        "000010000.jpg",
    ]
    assert [it.shard for it in ds.items] == [0, 0, 0, 1, 1]
    assert ds.load_image(4).size == (20, 16)
    assert ds.describe(4) == f"{shards / 's-00001.tar'}:000010001.jpg"

    assert len(load_unlabeled(shards)) == 5  # directory of shards
    assert len(load_unlabeled([str(shards / "s-00001.tar")])) == 2
    split = tmp_path / "split.txt"
    split.write_text("000010001.jpg\n000000000.jpg\n")
    assert [it.key for it in load_unlabeled(shards, split=split).items] == ["000010001.jpg", "000000000.jpg"]
    with pytest.raises(DatasetError, match=r"s-00002\.tar"):
        load_unlabeled(str(shards / "s-{00000..00002}.tar"))

    # the pixels read by offset match the member's bytes
    with tarfile.open(shards / "s-00000.tar") as tf:
        raw = tf.extractfile("000000001.jpg").read()  # type: ignore[union-attr]
    assert ds.stores[0].read("000000001.jpg") == raw


def test_unlabeled_dir_recursive_ignores_junk(folder: Path) -> None:
    _junk(folder)
    write_image(folder / "deep" / "er" / "z.bmp".upper())
    ds = load_unlabeled(folder)
    assert len(ds) == 8 and ds.classes is None
    assert "deep/er/Z.BMP" in [it.key for it in ds.items]
    assert ds.class_counts() == {}


def test_is_image_entry() -> None:
    assert is_image_entry("a/B.JPEG") and is_image_entry("x.tiff") and is_image_entry("x.webp")
    assert not is_image_entry("__MACOSX/a/x.jpg")
    assert not is_image_entry("a/.ipynb_checkpoints/x.jpg")
    assert not is_image_entry("a/x.txt") and not is_image_entry("a/")


# ---------------------------------------------------------------------------- decoding


def test_modes_to_rgb(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    root.mkdir()
    Image.new("L", (10, 8), 77).save(root / "gray.png")
    Image.new("RGB", (10, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "pal.gif"
    )
    Image.new("RGBA", (10, 8), (250, 0, 0, 100)).save(root / "rgba.png")
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(root / "cmyk.tif")
    Image.fromarray(np.full((8, 10), 65535, dtype=np.uint16)).save(root / "g16.png")
    ds = load_unlabeled(root)
    assert len(ds) == 5
    by_name = {Path(it.key).stem: ds.load_image(k) for k, it in enumerate(ds.items)}
    for name, img in by_name.items():
        assert img.mode == "RGB" and img.size == (10, 8), name
        x, _, _ = ds[[Path(it.key).stem for it in ds.items].index(name)]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 8, 10)
    assert by_name["gray"].getpixel((0, 0)) == (77, 77, 77)
    assert by_name["g16"].getpixel((0, 0)) == (255, 255, 255)
    assert by_name["rgba"].getpixel((0, 0)) == (250, 0, 0)
    assert by_name["cmyk"].getpixel((0, 0))[0] > 200


def test_corrupt_image_skipped_and_cached(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = folder / "Forest" / "Forest_9.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = load_labeled(folder)
    k = [it.key for it in ds.items].index("Forest/Forest_9.jpg")
    assert len(ds) == 8

    with caplog.at_level(logging.WARNING, logger="kt_train.data"):
        x, _, j = ds[k]
        ds[k]  # second time: no new warning, no new record
    assert j == (k + 1) % len(ds) and x.dtype == torch.uint8
    assert ds.bad == [(str(bad), ds.bad[0][1])] and "decode" in ds.bad[0][1]
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(DatasetError, match=r"Forest_9\.jpg"):
        ds.load_image(k)

    ds2 = load_labeled(folder)
    with caplog.at_level(logging.WARNING, logger="kt_train.data"):
        ds2.cache_in_memory(progress=True)
    assert len(ds2) == 7 and ds2.cached
    assert [p for p, _ in ds2.bad] == [str(bad)]
    assert "Forest/Forest_9.jpg" not in [it.key for it in ds2.items]
    assert any("skipped 1 unreadable images" in r.getMessage() for r in caplog.records)
    assert ds2.class_counts() == {"Forest": 3, "Highway": 2, "River": 2}
    assert torch.equal(ds2[0][0], load_labeled(folder)[0][0])


def test_all_unreadable(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / "d" / f"{k}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"{k}.png").write_bytes(b"garbage")
    ds = load_unlabeled(tmp_path / "d")
    with pytest.raises(DatasetError, match="no readable image"):
        ds[0]
    with pytest.raises(DatasetError, match="could be decoded"):
        load_unlabeled(tmp_path / "d").cache_in_memory()


def test_dataset_from_items_and_transform(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 30, 20)
    ds = ImageDataset(
        [FolderStore(tmp_path)], [Item("a.png", 1, (0, 0, 10, 10))], ["x", "y"], EvalTransform(8)
    )
    x, y, i = ds[0]
    assert tuple(x.shape) == (3, 8, 8) and (y, i) == (1, 0)


# ---------------------------------------------------------------------------- multiprocessing


def test_dataloader_workers_over_zip(folder: Path, tmp_path: Path) -> None:
    zpath = zip_folder(folder, tmp_path / "data.zip")
    ds = load_labeled(zpath, classes=None)
    ds.transform = EvalTransform(16)
    expected = torch.stack([ds[k][0] for k in range(len(ds))])  # opens the zip in this process first
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    xs, ys, idx = zip(*loader, strict=True)
    assert torch.equal(torch.cat(idx), torch.arange(len(ds)))
    assert torch.equal(torch.cat(xs), expected)
    assert torch.cat(ys).tolist() == [it.label for it in ds.items]


def test_stores_pickle_without_handles(tmp_path: Path) -> None:
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("a.png", image_bytes())
    store = ZipStore(zpath)
    data = store.read("a.png")
    clone = pickle.loads(pickle.dumps(store))
    assert clone._handle is None and clone.read("a.png") == data
    shard = write_shard(tmp_path / "s.tar", ["k"])
    tstore = TarStore(shard)
    tstore.read("k.jpg")
    assert pickle.loads(pickle.dumps(tstore)).read("k.jpg") == tstore.read("k.jpg")


def test_zip_handle_reopened_after_pid_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("a.png", image_bytes())
    store = ZipStore(zpath)
    data = store.read("a.png")
    parent_handle = store._handle
    monkeypatch.setattr(data_mod.os, "getpid", lambda: -12345)  # as seen from a forked worker
    assert store.read("a.png") == data
    assert store._handle is not parent_handle and parent_handle.fp is not None  # parent's left open


def test_cache_in_memory_gives_up_past_its_byte_budget(tmp_path: Path) -> None:
    from kt_train.data import load_unlabeled

    for k in range(5):
        write_image(tmp_path / "u" / f"{k}.png", 20, 10, seed=k)
    ds = load_unlabeled(tmp_path / "u")
    assert ds.cache_in_memory(max_bytes=100) is False  # 5 x 600 bytes decoded
    assert not ds.cached and len(ds) == 5 and ds[0][0].shape == (3, 10, 20)
    assert ds.cache_in_memory(max_bytes=5 * 600) is True and ds.cached

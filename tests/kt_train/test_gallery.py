"""Galleries: every source format round-trips, builds resume, search finds items, errors name the fix."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kt_train.embed import Encoder
from kt_train.errors import DatasetError
from kt_train.gallery import Gallery, build_gallery, import_embeddings

from ._images import random_image

# Distinct solid colours: an image's pixels say which item it is.
COLORS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 64, 0),
    (0, 128, 64),
]


def solid(color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root: Path, n: int = 5) -> dict[str, tuple[int, int, int]]:
    """n solid-colour PNGs in two subfolders, sizes differ per image; returns key -> colour."""
    keys = {}
    for i in range(n):
        key = f"{'ab'[i % 2]}/img_{i:02d}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(png_bytes(solid(COLORS[i], (20 + i, 16 + 2 * i))))
        keys[key] = COLORS[i]
    return keys


def write_img2dataset_shard(path: Path, samples: list[tuple[str, tuple[int, int, int]]]) -> None:
    """<key>.jpg + <key>.json (url, caption) + <key>.txt (caption), as img2dataset writes them."""
    with tarfile.open(path, "w") as tf:
        for key, color in samples:
            meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": f"json caption {key}"}
            for suffix, data in (
                (".jpg", png_bytes(solid(color, (16, 16)), "JPEG")),
                (".json", json.dumps(meta).encode()),
                (".txt", f"txt caption {key}".encode()),
            ):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_spec("timm:test_vit", image_size=32, device="cpu")


def colour_of(img: Image.Image) -> tuple[int, int, int]:
    arr = np.asarray(img, dtype=np.int64)
    return tuple(round(float(v)) for v in arr.reshape(-1, 3).mean(0))  # type: ignore[return-value]


def assert_gallery_consistent(g: Gallery, encoder: Encoder) -> None:
    """float16 unit-norm shards, ids 0..count-1, and every vector equals the encoder on its image."""
    ids = g.ids()
    assert [r["id"] for r in g.metadata()] == ids.tolist()
    for sh in g.shards:
        emb = np.load(g.path / "shards" / sh.name / "embeddings.npy")
        assert emb.dtype == np.float16 and emb.shape == (sh.count, g.dim)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    images = [g.open_image(int(i)) for i in ids]
    np.testing.assert_allclose(g.vectors(ids), encoder.encode_images(images), atol=3e-3)


# --------------------------------------------------------------------------- sources


def test_folder_gallery_round_trips_and_skips_corrupt_images(tmp_path: Path, encoder: Encoder) -> None:
    src = tmp_path / "imgs"
    keys = make_folder(src, 5)
    (src / "b" / "broken.png").write_bytes(b"not an image")
    seen: list[tuple[int, int]] = []
    g = build_gallery(
        [src],
        tmp_path / "g",
        encoder=encoder,
        shard_size=2,
        batch_size=2,
        progress=lambda done, total, rate: seen.append((done, total)),
    )
    assert g.count == 5 and g.dim == encoder.dim and len(g.shards) == 3
    assert seen[-1] == (6, 6)
    rows = g.metadata()
    assert [r["key"] for r in rows] == sorted(keys)
    assert {r["source"] for r in rows} == {str(src)}
    for r in rows:
        img = g.open_image(r["id"])
        assert colour_of(img) == keys[r["key"]]
        assert (r["width"], r["height"]) == img.size
    doc = json.loads((g.path / "gallery.json").read_text())
    assert doc["num_skipped"] == 1 and doc["skipped"][0]["key"] == "b/broken.png"
    assert doc["sources"] == [{"path": str(src), "split": None, "kind": "folder"}]
    # shard-00001 lost the broken image; ids stay contiguous
    assert [(s["count"], s["id_offset"]) for s in doc["shards"]] == [(2, 0), (1, 2), (2, 3)]
    assert_gallery_consistent(g, encoder)
    # metadata / vectors by id in any order
    assert [r["id"] for r in g.metadata(np.array([4, 0, 2]))] == [4, 0, 2]
    np.testing.assert_array_equal(g.vectors([3, 1])[0], g.vectors([3])[0])


def test_zip_gallery_with_split(tmp_path: Path, encoder: Encoder) -> None:
    folder = tmp_path / "imgs"
    keys = make_folder(folder, 6)
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for k in keys:
            zf.write(folder / k, k)
    split = tmp_path / "split.txt"
    chosen = ["b/img_03.png", "a/img_00.png", "a/img_04.png"]
    split.write_text("\n".join(chosen) + "\n")
    g = build_gallery([(archive, split)], tmp_path / "g", encoder=encoder, shard_size=2)
    rows = g.metadata()
    assert [r["key"] for r in rows] == chosen  # the split's order
    assert {r["source"] for r in rows} == {str(archive)}
    assert [colour_of(g.open_image(r["id"])) for r in rows] == [keys[k] for k in chosen]
    assert g.doc["sources"] == [{"path": str(archive), "split": str(split), "kind": "zip"}]
    assert_gallery_consistent(g, encoder)


def test_tar_shards_with_sidecars(tmp_path: Path, encoder: Encoder) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_img2dataset_shard(shards / "00000.tar", [("000000000", COLORS[0]), ("000000001", COLORS[1])])
    write_img2dataset_shard(shards / "00001.tar", [("000001000", COLORS[2])])
    g = build_gallery([shards], tmp_path / "g", encoder=encoder, shard_size=2)
    rows = g.metadata()
    assert [(Path(r["source"]).name, r["key"]) for r in rows] == [
        ("00000.tar", "000000000.jpg"),
        ("00000.tar", "000000001.jpg"),
        ("00001.tar", "000001000.jpg"),
    ]
    assert rows[2]["url"] == "https://example.com/000001000.jpg"
    assert rows[2]["caption"] == "json caption 000001000"  # the json wins over the .txt
    for r, color in zip(rows, COLORS, strict=False):
        assert np.abs(np.subtract(colour_of(g.open_image(r["id"])), color)).max() <= 3  # JPEG
    assert g.doc["sources"][0]["kind"] == "tar"
    assert_gallery_consistent(g, encoder)

    # the same shards through a brace pattern; a .txt-only sample keeps its caption
    with tarfile.open(shards / "00001.tar", "w") as tf:
        for name, data in (("x.png", png_bytes(solid(COLORS[3]))), ("x.txt", b"only txt")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    g2 = build_gallery([str(shards / "{00000..00001}.tar")], tmp_path / "g2", encoder=encoder)
    last = g2.metadata([g2.count - 1])[0]
    assert (last["key"], last["caption"], last["url"]) == ("x.png", "only txt", None)


def test_open_clip_encoder_gallery(tmp_path: Path) -> None:
    """The default kind of encoder for real galleries: an open_clip image tower (a tiny random one)."""
    import open_clip.factory

    name = "kt-test-tiny"
    open_clip.factory._MODEL_CONFIGS[name] = {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    try:
        src = tmp_path / "imgs"
        make_folder(src, 3)
        enc = Encoder.from_spec(f"open_clip:{name}", device="cpu")
        g = build_gallery([src], tmp_path / "g", encoder=enc)
        assert g.dim == 24 and g.encoder["spec"] == f"open_clip:{name}" and g.encoder["image_size"] == 32
        assert_gallery_consistent(g, enc)
        # the spec string works as well, and the recorded description rebuilds a matching encoder
        g2 = build_gallery([src], tmp_path / "g2", encoder=f"open_clip:{name}", device="cpu", index_kind=None)
        assert g2.encoder == g.encoder
        g.check_encoder(Encoder.from_description(g2.encoder, device="cpu"))
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(name, None)


def test_decoding_workers_give_the_same_gallery(tmp_path: Path, encoder: Encoder) -> None:
    src = tmp_path / "imgs"
    make_folder(src, 5)
    a = build_gallery([src], tmp_path / "a", encoder=encoder, shard_size=3, batch_size=2, index_kind=None)
    b = build_gallery(
        [src], tmp_path / "b", encoder=encoder, shard_size=3, batch_size=2, num_workers=2, index_kind=None
    )
    assert a.metadata() == b.metadata()
    np.testing.assert_array_equal(a.vectors(a.ids()), b.vectors(b.ids()))


# --------------------------------------------------------------------------- resume


def test_interrupted_build_resumes_without_re_embedding(
    tmp_path: Path, encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "imgs"
    make_folder(src, 7)
    reference = build_gallery([src], tmp_path / "ref", encoder=encoder, shard_size=2, batch_size=2)

    embedded: list[int] = []
    real = encoder.encode_tensor

    def counting(batch):  # type: ignore[no-untyped-def]
        embedded.append(len(batch))
        return real(batch)

    monkeypatch.setattr(encoder, "encode_tensor", counting)

    def crash_after_first_shard(done: int, total: int, rate: float) -> None:
        if done >= 2:  # shard-00000 is written before progress reports it
            raise KeyboardInterrupt

    out = tmp_path / "g"
    with pytest.raises(KeyboardInterrupt):
        build_gallery(
            [src], out, encoder=encoder, shard_size=2, batch_size=2, progress=crash_after_first_shard
        )
    assert (out / "shards" / "shard-00000" / "_SUCCESS").exists()
    assert not (out / "shards" / "shard-00001").exists()
    with pytest.raises(DatasetError, match=r"incomplete.*resume"):
        Gallery.open(out)

    embedded.clear()
    g = build_gallery([src], out, encoder=encoder, shard_size=2, batch_size=2)
    assert sum(embedded) == 5  # shard 0 (2 images) was not embedded again
    assert g.metadata() == reference.metadata()
    np.testing.assert_array_equal(g.vectors(g.ids()), reference.vectors(reference.ids()))

    # a lost shard is rebuilt alone
    shutil.rmtree(out / "shards" / "shard-00003")
    with pytest.raises(DatasetError, match="lacks finished shards"):
        Gallery.open(out)
    embedded.clear()
    g = build_gallery([src], out, encoder=encoder, shard_size=2, batch_size=2)
    assert sum(embedded) == 1
    np.testing.assert_array_equal(g.vectors(g.ids()), reference.vectors(reference.ids()))

    # a finished gallery is returned as is
    embedded.clear()
    build_gallery([src], out, encoder=encoder, shard_size=2, batch_size=2)
    assert embedded == []


# --------------------------------------------------------------------------- search


def test_search_finds_each_item_first_across_shards(tmp_path: Path, encoder: Encoder) -> None:
    src = tmp_path / "noise"
    src.mkdir()
    for i in range(12):
        random_image(28, 28, seed=i).save(src / f"{i:02d}.png")
    g = build_gallery([src], tmp_path / "g", encoder=encoder, shard_size=5)
    assert len(g.shards) == 3 and g.doc["index"] is not None
    assert all((g.path / e["path"]).exists() for e in g.doc["index"]["shards"])
    scores, ids = g.search(g.vectors(g.ids()), 3)
    assert ids.shape == (12, 3)
    np.testing.assert_array_equal(ids[:, 0], np.arange(12))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # reopened from disk, and a single query vector
    g2 = Gallery.open(g.path)
    _, ids2 = g2.search(g.vectors([7])[0], 1)
    assert ids2.tolist() == [[7]]
    # another index kind, rebuilt in place and recorded
    g2.build_index("ivf_flat")
    assert {e["plan"]["kind"] for e in Gallery.open(g.path).doc["index"]["shards"]} == {"ivf_flat"}
    _, ids3 = g2.search(g.vectors(g.ids()), 1, nprobe=4)
    np.testing.assert_array_equal(ids3[:, 0], np.arange(12))


# --------------------------------------------------------------------------- import


def _write_precomputed(
    root: Path, parts: list[np.ndarray], rows: list[int] | None = None
) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb, meta = root / "embeddings", root / "metadata"
    emb.mkdir(parents=True)
    meta.mkdir(parents=True)
    start = 0
    for n, arr in enumerate(parts):
        np.save(emb / f"img_emb_{n}.npy", arr)
        m = len(arr) if rows is None else rows[n]
        paths = [f"img_{start + i:03d}.png" for i in range(m)]
        table = pa.table(
            {
                "image_path": paths,
                "url": [f"https://example.com/{p}" for p in paths],
                "caption": [f"caption {start + i}" for i in range(m)],
            }
        )
        pq.write_table(table, meta / f"metadata_{n}.parquet")
        start += m
    return emb, meta


def test_import_precomputed_embeddings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 16)).astype(np.float32) * 3  # not normalized
    b = rng.normal(size=(5, 16)).astype(np.float16)
    emb, meta = _write_precomputed(tmp_path / "pre", [a, b])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        solid(COLORS[i % len(COLORS)]).save(images / f"img_{i:03d}.png")
    g = import_embeddings(
        emb, meta, tmp_path / "g", image_root=images, encoder_spec="open_clip:ViT-B-32@openai"
    )
    assert g.count == 12 and g.dim == 16 and len(g.shards) == 2
    assert g.encoder == {"spec": "open_clip:ViT-B-32@openai", "dim": 16, "imported_from": str(emb)}
    expected = np.concatenate([a, b.astype(np.float32)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(g.vectors(g.ids()), expected, atol=2e-3)
    assert g.doc["sources"][0]["kind"] == "precomputed"
    row = g.metadata([9])[0]
    assert (row["id"], row["key"], row["url"], row["caption"]) == (
        9,
        "img_009.png",
        "https://example.com/img_009.png",
        "caption 9",
    )
    assert (row["width"], row["height"]) == (-1, -1)
    assert colour_of(g.open_image(9)) == COLORS[9 % len(COLORS)]
    _, ids = g.search(expected, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(12))

    # without image_root the rows keep their metadata but have no local image
    g2 = import_embeddings(emb, meta, tmp_path / "g2")
    assert g2.encoder["spec"] is None
    with pytest.raises(DatasetError, match="image_root"):
        g2.open_image(0)


def test_import_errors_name_the_fix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb, meta = _write_precomputed(tmp_path / "rows", [rng.normal(size=(4, 8)).astype(np.float32)], rows=[3])
    with pytest.raises(DatasetError, match=r"4 rows but .* has 3"):
        import_embeddings(emb, meta, tmp_path / "g1")
    emb, meta = _write_precomputed(
        tmp_path / "dims", [np.ones((2, 8), np.float32), np.ones((2, 6), np.float32)]
    )
    with pytest.raises(DatasetError, match="different dimensions"):
        import_embeddings(emb, meta, tmp_path / "g2")
    emb, meta = _write_precomputed(tmp_path / "lonely", [np.ones((2, 8), np.float32)])
    np.save(emb / "img_emb_1.npy", np.ones((2, 8), np.float32))
    with pytest.raises(DatasetError, match=r"metadata_1\.parquet"):
        import_embeddings(emb, meta, tmp_path / "g3")
    with pytest.raises(DatasetError, match=r"img_emb_<n>\.npy"):
        import_embeddings(tmp_path, meta, tmp_path / "g4")
    zero = np.ones((3, 8), np.float32)
    zero[1] = 0
    emb, meta = _write_precomputed(tmp_path / "zero", [zero])
    with pytest.raises(DatasetError, match=r"row 1 of .* all zeros"):
        import_embeddings(emb, meta, tmp_path / "g5")


# --------------------------------------------------------------------------- errors


def test_build_errors_name_the_fix(tmp_path: Path, encoder: Encoder) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        build_gallery([empty], tmp_path / "g0", encoder=encoder)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="none of the 1 images"):
        build_gallery([broken], tmp_path / "g1", encoder=encoder)

    src, other = tmp_path / "src", tmp_path / "other"
    make_folder(src, 2)
    make_folder(other, 3)
    out = tmp_path / "g"
    build_gallery([src], out, encoder=encoder, index_kind=None)
    with pytest.raises(DatasetError, match=r"new output directory.*overwrite"):
        build_gallery([other], out, encoder=encoder, index_kind=None)
    g = build_gallery([other], out, encoder=encoder, index_kind=None, overwrite=True)
    assert g.count == 3

    not_gallery = tmp_path / "stuff"
    not_gallery.mkdir()
    (not_gallery / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a gallery"):
        build_gallery([src], not_gallery, encoder=encoder, overwrite=True)
    assert (not_gallery / "keep.txt").read_text() == "mine"
    with pytest.raises(DatasetError, match="not a gallery"):
        Gallery.open(not_gallery)
    with pytest.raises(DatasetError, match="has no index"):
        g.search(g.vectors([0]), 1)
    with pytest.raises(DatasetError, match="no id 3"):
        g.vectors([3])


def test_check_encoder_names_both_models(tmp_path: Path, encoder: Encoder) -> None:
    src = tmp_path / "imgs"
    make_folder(src, 2)
    g = build_gallery([src], tmp_path / "g", encoder=encoder, index_kind=None)
    g.check_encoder(encoder)
    other = Encoder.from_spec("timm:test_efficientnet", image_size=32, device="cpu")
    with pytest.raises(DatasetError) as info:
        g.check_encoder(other)
    msg = str(info.value)
    assert "timm:test_vit (64-d, 32 px)" in msg and "timm:test_efficientnet (256-d, 32 px)" in msg
    assert "Encoder.from_description" in msg

"""Segmentation dataset uploads (issue 15 item 4) through the real server: a zip of images/ +
masks/ (+ classes.json, or the `classes` / `void_index` fields) is stored in the layout
``kt_train.tasks.segmentation.SegmentationDataset`` reads; every mask rule is a 422 naming the
file with nothing kept; the service's checks and the library's refuse the same damaged dataset;
migration 0008 gives existing datasets the task classification."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.api.errors import Invalid
from service.segmentation_uploads import ingest_segmentation_zip
from tests.service.test_api import Api, image_bytes, make_settings, make_zip, running_api
from tests.service.test_uploads import assert_rejected

CLASSES = ["red", "green", "blue"]
PALETTE = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230]], dtype=np.uint8)
VOID = 255


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def frame(i: int, h: int = 48, w: int = 64) -> tuple[bytes, np.ndarray]:
    """An image of coloured blocks (colour = class) and its index mask, void on the top rows."""
    rng = np.random.default_rng(i)
    grid = rng.integers(0, 3, size=(h // 8, w // 8))
    mask = np.kron(grid, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    img = PALETTE[mask]
    mask[:8] = VOID
    return png(img), mask


def seg_files(n: int = 3, *, top: str = "camvid/", classes_json: bool = True) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i in range(n):
        img, mask = frame(i)
        files[f"{top}images/train/f{i:03d}.png"] = img
        files[f"{top}masks/train/f{i:03d}.png"] = png(mask, "L")
    if classes_json:
        files[f"{top}classes.json"] = json.dumps({"classes": CLASSES, "void_index": VOID}).encode()
    return files


def damage(files: dict[str, bytes], how: str, top: str = "camvid/") -> dict[str, bytes]:
    """``files`` with frame f001 broken in one way (the library's test has the same cases)."""
    files = dict(files)
    mask_name, img_name = f"{top}masks/train/f001.png", f"{top}images/train/f001.png"
    if how == "wrong_size":
        files[mask_name] = png(np.zeros((48, 32), np.uint8), "L")
    elif how == "out_of_range":
        arr = np.asarray(Image.open(io.BytesIO(files[mask_name]))).copy()
        arr[20, 20] = 7
        files[mask_name] = png(arr, "L")
    elif how == "missing_mask":
        del files[mask_name]
    elif how == "mask_without_image":
        del files[img_name]
    elif how == "colour_mask":
        files[mask_name] = png(np.zeros((48, 64, 3), np.uint8))
    elif how == "no_classes":
        del files[f"{top}classes.json"]
    return files


# (damage, what the service's 422 says: the file and the rule, in the library's words)
DAMAGES = [
    ("wrong_size", "mask masks/train/f001.png is 32x48 but its image images/train/f001.png is 64x48"),
    (
        "out_of_range",
        "mask masks/train/f001.png has values [7] outside the 3 classes (0..2 or the void index 255)",
    ),
    ("missing_mask", "1 image(s) have no mask, e.g. images/train/f001.png"),
    ("mask_without_image", "1 mask(s) have no image, e.g. masks/train/f001.png"),
    ("colour_mask", "mask masks/train/f001.png is a RGB image"),
    ("no_classes", "has no classes.json"),
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_api(make_settings(tmp_path_factory.mktemp("seg-uploads") / "data")) as running:
        yield running


@pytest.fixture(scope="module")
def client(api: Api) -> Iterator[httpx.Client]:
    with api.client(api.key("segmenter")) as c:
        yield c


def post(client: httpx.Client, files: dict[str, bytes], **fields: str) -> httpx.Response:
    form = {"name": "camvid", "task": "segmentation", **fields}
    return client.post(
        "/v1/datasets", files={"file": ("camvid.zip", make_zip(files), "application/zip")}, data=form
    )


def stored(api: Api, dataset_id: str) -> Path:
    return next((api.settings.data_dir / "tenants").glob(f"*/datasets/{dataset_id}"))


def test_a_segmentation_zip_is_stored_in_the_layout_the_library_reads(api: Api, client: httpx.Client) -> None:
    from kt_train.tasks.segmentation import SegmentationDataset

    response = post(client, seg_files(3))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["task"] == "segmentation" and body["num_images"] == 3 and body["classes"] == CLASSES
    assert set(body["class_counts"]) == set(CLASSES) and all(
        1 <= n <= 3 for n in body["class_counts"].values()
    )
    root = stored(api, body["id"])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        f"{d}/train/f{i:03d}.png" for d in ("images", "masks") for i in range(3)
    ]
    assert json.loads((root / "classes.json").read_text()) == {"classes": CLASSES, "void_index": VOID}
    ds = SegmentationDataset(root)  # validates every pair
    assert len(ds) == 3 and ds.classes == CLASSES and ds.void_index == VOID
    _, mask = ds.load(0)
    assert (mask == frame(0)[1]).all()
    listed = client.get("/v1/datasets").json()["data"]
    assert {d["id"]: d["task"] for d in listed}[body["id"]] == "segmentation"


def test_palette_masks_and_classes_from_form_fields_are_accepted(api: Api, client: httpx.Client) -> None:
    files = seg_files(2, top="", classes_json=False)
    _, mask = frame(1)
    p = Image.fromarray(mask, mode="P")
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9] * (256 * 3 - 9))
    buf = io.BytesIO()
    p.save(buf, format="PNG")
    files["masks/train/f001.png"] = buf.getvalue()
    response = post(client, files, classes="red, green, blue", void_index="255")
    assert response.status_code == 201, response.text
    root = stored(api, response.json()["id"])
    assert json.loads((root / "classes.json").read_text()) == {"classes": CLASSES, "void_index": VOID}
    assert (np.asarray(Image.open(root / "masks/train/f001.png")) == mask).all()


@pytest.mark.parametrize(("how", "needle"), DAMAGES)
def test_bad_masks_are_422_naming_the_file_and_nothing_is_kept(
    api: Api, client: httpx.Client, how: str, needle: str
) -> None:
    assert_rejected(api, post(client, damage(seg_files(3), how)), 422, needle)


@pytest.mark.parametrize(
    ("files", "fields", "status", "needles"),
    [
        (damage(seg_files(2), "no_classes"), {"classes": '["only"]'}, 422, ("at least two classes",)),
        (damage(seg_files(2), "no_classes"), {"classes": "a,b,c", "void_index": "1"}, 422, ("void_index 1 is the index of class 'b'",)),
        (seg_files(2), {"classes": "a,b,c"}, 422, ("given twice",)),
        ({**seg_files(2), "camvid/notes.txt": b"hi"}, {}, 422, ("outside the segmentation layout", "camvid/notes.txt")),
        ({**seg_files(2), "camvid/images/train/x.jpg": b"not a jpeg", "camvid/masks/train/x.png": png(np.zeros((4, 4), np.uint8), "L")},
         {}, 422, ("images/train/x.jpg", "not a readable image")),
        ({**seg_files(2), "camvid/masks/train/f000.png": b"\x89PNG broken"}, {}, 422, ("mask masks/train/f000.png is not a readable PNG",)),
        ({**seg_files(2), "../evil.png": b"x"}, {}, 400, ("'../evil.png'", "..")),
        (seg_files(2), {"task": "detection"}, 422, ("`task`", "classification, segmentation")),
        (seg_files(2), {"task": "classification"}, 422, ("task=segmentation",)),
    ],
    ids=["one-class", "void-is-a-class", "classes-twice", "stray-file", "broken-image", "broken-mask",
         "zip-slip", "unknown-task", "sent-as-classification"],
)  # fmt: skip
def test_other_bad_segmentation_uploads_are_refused(
    api: Api, client: httpx.Client, files: dict[str, bytes], fields: dict[str, str], status: int,
    needles: tuple[str, ...],
) -> None:  # fmt: skip
    assert_rejected(api, post(client, files, **fields), status, *needles)


def test_segmentation_fields_on_a_classification_upload_are_422(api: Api, client: httpx.Client) -> None:
    files = {"a/x.png": image_bytes((1, 1, 1)), "b/y.png": image_bytes((2, 2, 2))}
    response = client.post(
        "/v1/datasets",
        files={"file": ("d.zip", make_zip(files), "application/zip")},
        data={"classes": "a,b"},
    )
    assert_rejected(api, response, 422, "`classes`", "task=segmentation")


@pytest.mark.parametrize(("how", "needle"), DAMAGES)
def test_the_service_and_the_library_refuse_the_same_damaged_dataset(
    tmp_path: Path, how: str, needle: str
) -> None:
    """One damaged dataset, as the zip the service takes and as the folder the library reads: both
    refuse it, naming the same file in the same words."""
    from kt_train.errors import DatasetError
    from kt_train.tasks.segmentation import SegmentationDataset

    files = damage(seg_files(3, top=""), how, top="")
    folder = tmp_path / "ds"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(DatasetError) as library:
        SegmentationDataset(folder)
    settings = make_settings(tmp_path / "data")
    with pytest.raises(Invalid) as service:
        ingest_segmentation_zip(archive, tmp_path / "out", settings)
    assert needle in str(service.value) and needle in str(library.value), (service.value, library.value)
    assert not (tmp_path / "out").exists()


def test_migration_0008_gives_existing_datasets_the_classification_task(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import inspect, text

    from service.db.session import alembic_config, make_engine

    url = f"sqlite:///{tmp_path / 'kt.db'}"
    config = alembic_config(url)
    command.upgrade(config, "0007")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'old', '2026-01-01')")
            )
            conn.execute(
                text(
                    "INSERT INTO datasets (id, tenant_id, name, status, num_images, classes, class_counts, "
                    "bytes, created_at) VALUES ('d1', 't1', 'old', 'ready', 2, '[]', '{}', 10, '2026-01-01')"
                )
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert (
                conn.execute(text("SELECT task FROM datasets WHERE id = 'd1'")).scalar() == "classification"
            )
        command.downgrade(config, "0007")
        with engine.connect() as conn:
            assert "task" not in {c["name"] for c in inspect(conn).get_columns("datasets")}
            assert conn.execute(text("SELECT count(*) FROM datasets")).scalar() == 1
    finally:
        engine.dispose()

"""Dataset uploads: layouts, limits, unsafe archives and broken images, through the real server
(and ``ingest_zip`` directly for the checks that need no HTTP)."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.errors import BadRequest, Invalid, TooLarge
from service.settings import Settings
from service.uploads import ingest_zip
from tests.service.test_api import (
    Api,
    image_bytes,
    imagefolder_zip,
    make_settings,
    make_zip,
    running_api,
    upload,
)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with running_api(make_settings(tmp_path_factory.mktemp("uploads") / "data")) as running:
        yield running


@pytest.fixture(scope="module")
def client(api: Api) -> Iterator[httpx.Client]:
    with api.client(api.key("uploader")) as c:
        yield c


def stored_files(api: Api) -> list[Path]:
    return [p for p in (api.settings.data_dir / "tenants").rglob("*") if p.is_file()]


def assert_rejected(api: Api, response: httpx.Response, status: int, *needles: str) -> None:
    before = len(stored_files(api))
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for needle in needles:
        assert needle in detail, detail
    assert len(stored_files(api)) == before  # nothing of it was kept
    assert list((api.settings.data_dir / "tmp").iterdir()) == []  # nor the upload
    hidden = [p for p in (api.settings.data_dir / "tenants").rglob(".*")]
    assert hidden == []  # no staging directory left behind


def test_labels_csv_layout(api: Api, client: httpx.Client) -> None:
    files = {f"img{i}.jpg": image_bytes((i * 30, 0, 0), "JPEG") for i in range(5)}
    files["labels.csv"] = (
        b"path,label\nimg0.jpg,red\nimg1.jpg,red\nimg2.jpg,blue\nimg3.jpg,blue\nimg4.jpg,blue\n"
    )
    files["__MACOSX/._img0.jpg"] = b"junk"
    files[".DS_Store"] = b"junk"
    response = upload(client, make_zip(files), name="csv")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["class_counts"] == {"blue": 3, "red": 2} and body["num_images"] == 5
    images = api.settings.data_dir / "tenants"
    assert len(list(images.rglob(f"{body['id']}/images/red/*.jpg"))) == 2


def test_labels_csv_must_cover_every_image(api: Api, client: httpx.Client) -> None:
    files = {
        "a.png": image_bytes((1, 2, 3)),
        "b.png": image_bytes((3, 2, 1)),
        "c.png": image_bytes((0, 0, 0)),
    }
    files["labels.csv"] = b"path,label\na.png,x\nb.png,y\n"
    assert_rejected(api, upload(client, make_zip(files)), 422, "not listed in labels.csv", "c.png")
    files["labels.csv"] = b"path,label\na.png,x\nb.png,y\nc.png,y\nmissing.png,x\n"
    assert_rejected(api, upload(client, make_zip(files)), 422, "not in the archive", "missing.png")


def test_oversized_upload_is_413(api: Api, client: httpx.Client) -> None:
    big = make_zip({"a/x.png": os.urandom(150_000), "b/y.png": os.urandom(150_000)})
    assert_rejected(api, upload(client, big), 413, "200000 bytes")


def test_zip_slip_is_400_and_writes_nothing_outside(api: Api, client: httpx.Client) -> None:
    archive = make_zip(
        {"a/x.png": image_bytes((1, 1, 1)), "b/y.png": image_bytes((2, 2, 2)), "../evil.png": b"x"}
    )
    assert_rejected(api, upload(client, archive), 400, "'../evil.png'", "..")
    root = api.settings.data_dir.parent
    assert not (root / "evil.png").exists() and not list(root.rglob("evil.png"))


@pytest.mark.parametrize(
    ("entry", "needle"), [("/etc/evil.png", "absolute path"), ("C:/evil.png", "absolute path")]
)
def test_absolute_paths_are_400(api: Api, client: httpx.Client, entry: str, needle: str) -> None:
    archive = make_zip({"a/x.png": image_bytes((1, 1, 1)), "b/y.png": image_bytes((2, 2, 2)), entry: b"x"})
    assert_rejected(api, upload(client, archive), 400, needle)


def test_symlinks_are_400(api: Api, client: httpx.Client) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/x.png", image_bytes((1, 1, 1)))
        zf.writestr("b/y.png", image_bytes((2, 2, 2)))
        link = zipfile.ZipInfo("b/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    assert_rejected(api, upload(client, buf.getvalue()), 400, "symbolic link", "b/link.png")


def test_corrupt_image_is_422_and_named(api: Api, client: httpx.Client) -> None:
    archive = make_zip(
        {
            "a/x.png": image_bytes((1, 1, 1)),
            "b/y.png": image_bytes((2, 2, 2)),
            "b/broken.jpg": b"\xff\xd8not a jpeg",
        }
    )
    assert_rejected(api, upload(client, archive), 422, "b/broken.jpg", "1 image(s)")


def test_single_class_is_422(api: Api, client: httpx.Client) -> None:
    assert_rejected(api, upload(client, imagefolder_zip({"only": 3})), 422, "at least 2 classes", "'only'")


def test_empty_class_folder_is_422(api: Api, client: httpx.Client) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a/x.png", image_bytes((1, 1, 1)))
        zf.writestr("b/y.png", image_bytes((2, 2, 2)))
        zf.writestr(zipfile.ZipInfo("c/"), b"")
    assert_rejected(api, upload(client, buf.getvalue()), 422, "without images", "c")


def test_non_images_and_bad_zip(api: Api, client: httpx.Client) -> None:
    archive = make_zip(
        {"a/x.png": image_bytes((1, 1, 1)), "b/y.png": image_bytes((2, 2, 2)), "b/notes.txt": b"hi"}
    )
    assert_rejected(api, upload(client, archive), 422, "not images", "b/notes.txt")
    assert_rejected(api, upload(client, b"PK not really a zip"), 400, "not a valid zip")


def test_too_many_files_is_413(api: Api, client: httpx.Client) -> None:
    archive = imagefolder_zip({"a": 30, "b": 30})  # the test server allows 50 entries
    assert_rejected(api, upload(client, archive), 413, "60 entries", "limit of 50")


def test_missing_file_field_is_422(api: Api, client: httpx.Client) -> None:
    response = client.post("/v1/datasets", data={"name": "x"}, files={"other": ("a.txt", b"x")})
    assert_rejected(api, response, 422, "`file`")
    not_multipart = client.post("/v1/datasets", json={"name": "x"})
    assert_rejected(api, not_multipart, 422, "multipart/form-data")


def test_upload_needs_a_key(api: Api) -> None:
    with api.client() as anonymous:
        response = upload(anonymous, imagefolder_zip({"a": 1, "b": 1}))
    assert response.status_code == 401


def test_zip_bomb_ratio_and_pixel_limit(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_upload_bytes=50_000_000, max_image_pixels=100)
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(make_zip({"a/x.png": b"\0" * 5_000_000, "b/y.png": image_bytes((1, 1, 1))}))
    with pytest.raises(TooLarge, match="zip bomb"):
        ingest_zip(bomb, tmp_path / "out", settings)
    small = Settings(data_dir=tmp_path / "data", max_upload_bytes=1_000_000)
    with pytest.raises(TooLarge, match="expands to"):
        ingest_zip(bomb, tmp_path / "out", small)
    big_images = tmp_path / "big.zip"
    big_images.write_bytes(imagefolder_zip({"a": 1, "b": 1}))  # 16x16 = 256 px > 100
    with pytest.raises(Invalid, match="more than the limit of 100"):
        ingest_zip(big_images, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".staging-*"))


def test_imagefolder_deeper_than_one_top_folder_is_422(tmp_path: Path) -> None:
    archive = tmp_path / "deep.zip"
    archive.write_bytes(make_zip({"a/x/1.png": image_bytes((1, 1, 1)), "b/y/2.png": image_bytes((2, 2, 2))}))
    with pytest.raises(Invalid, match="don't fit"):
        ingest_zip(archive, tmp_path / "out", Settings(data_dir=tmp_path / "data"))
    unsafe = tmp_path / "unsafe.zip"
    unsafe.write_bytes(make_zip({"a\\..\\..\\x.png": b"x"}))
    with pytest.raises(BadRequest, match=r"\.\."):
        ingest_zip(unsafe, tmp_path / "out", Settings(data_dir=tmp_path / "data"))


def test_limit_is_enforced_while_streaming_without_content_length(api: Api, client: httpx.Client) -> None:
    """A chunked body has no Content-Length to check up front: the limit stops the stream."""
    boundary = "kt-test-boundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        for _ in range(30):  # 300 kB in 10 kB chunks, over the 200 kB limit
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/datasets", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_rejected(api, response, 413, "limit of 200000 bytes")

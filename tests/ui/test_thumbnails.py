"""Dataset thumbnails are made once, with bounded memory, and cached beside the dataset
(``service.thumbnails``): a second request reads the cache, deleting the dataset deletes them, an
image over the pixel cap is never decoded, and a flood of requests for big images (16 at once, 4
distinct 9000×9000 PNGs of 258 KB each, which took the API to 9.8 GB when every request decoded its
image) keeps a real uvicorn API process's peak memory within 500 MB of where it was."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import storage
from service.admin import create_tenant_key
from service.app import create_app
from service.db.models import Tenant
from service.db.session import init_db, make_engine, make_session_factory
from service.settings import Settings
from service.thumbnails import thumb_path
from service.ui.auth import COOKIE_NAME
from service.ui.routes import THUMB_PX
from tests.reliability.conftest import child_env, running, start_api
from tests.service.conftest import _clean_kt_env  # noqa: F401 - autouse fixture
from tests.ui.conftest import _store_dataset

BIG = 9000  # px a side: 81 Mpx, under the default cap of 89.5 Mpx
FLOOD = 16
MAX_GROWTH_MB = 500
COLOURS = {"red": (200, 30, 40), "green": (30, 180, 60), "blue": (40, 60, 210), "grey": (128, 128, 128)}


def make_images(folder: Path, size: int, suffix: str = ".png") -> Path:
    """Two classes of single-colour images (one colour each, so a thumbnail's colour names its
    source): ``a/red``, ``a/green``, ``b/blue``, ``b/grey``."""
    for cls, names in (("a", ("red", "green")), ("b", ("blue", "grey"))):
        (folder / cls).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (size, size), COLOURS[name]).save(folder / cls / f"{name}{suffix}")
    return folder


def stored_dataset(settings: Settings, source: Path) -> tuple[str, str, str]:
    """A tenant's API key, and the tenant and id of a ready dataset of ``source``'s images."""
    init_db(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as s:
            key = create_tenant_key(s, "acme")
            tenant = s.query(Tenant).filter_by(name="acme").one()
            ds = _store_dataset(settings, tenant.id, "big", source)
            s.add(ds)
            s.commit()
            return key, tenant.id, ds.id
    finally:
        engine.dispose()


def assert_thumbnail_of(content: bytes, colour: str) -> None:
    with Image.open(io.BytesIO(content)) as img:
        assert img.format == "JPEG" and max(img.size) <= THUMB_PX and min(img.size) > 0, img.size
        pixel = img.convert("RGB").getpixel((img.width // 2, img.height // 2))
    assert all(abs(a - b) <= 12 for a, b in zip(pixel, COLOURS[colour], strict=True)), (pixel, colour)


@dataclass
class World:
    client: TestClient
    settings: Settings
    key: str
    tenant_id: str
    dataset_id: str

    def dataset_dir(self) -> Path:
        return storage.dataset_dir(self.settings.data_dir, self.tenant_id, self.dataset_id)

    def thumb(self, cls: str, name: str) -> httpx.Response:
        return self.client.get(f"/ui/datasets/{self.dataset_id}/thumbs/{cls}/{name}")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    settings = Settings(data_dir=tmp_path / "data")  # type: ignore[call-arg]
    key, tenant_id, dataset_id = stored_dataset(settings, make_images(tmp_path / "src", 300))
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        r = client.post("/ui/login", data={"api_key": key}, follow_redirects=False)
        assert r.status_code == 303, r.text
        yield World(client, settings, key, tenant_id, dataset_id)


def test_a_thumbnail_is_made_once_then_read_from_its_cache_beside_the_dataset(world: World) -> None:
    first = world.thumb("a", "red.png")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert_thumbnail_of(first.content, "red")
    cached = thumb_path(world.dataset_dir(), "a", "red.png", THUMB_PX)
    assert cached.is_file() and cached.read_bytes() == first.content
    assert cached.stat().st_mode & 0o077 == 0  # written 0600, like the data dir's other files
    assert not [p.name for p in cached.parent.iterdir() if p.name.startswith(".tmp-")]  # renamed into place

    # the source is not read again: break it, and the thumbnail is still served, from the cache
    (world.dataset_dir() / "images" / "a" / "red.png").write_bytes(b"not an image any more")
    again = world.thumb("a", "red.png")
    assert again.status_code == 200 and again.content == first.content
    # while a thumbnail never made reads the broken file: no thumbnail, and nothing cached
    (world.dataset_dir() / "images" / "a" / "green.png").write_bytes(b"garbage")
    assert world.thumb("a", "green.png").status_code == 404
    assert not thumb_path(world.dataset_dir(), "a", "green.png", THUMB_PX).exists()


def test_deleting_the_dataset_deletes_its_thumbnails(world: World) -> None:
    for cls, name in (("a", "red.png"), ("b", "blue.png")):
        assert world.thumb(cls, name).status_code == 200
    thumbs = world.dataset_dir() / "thumbs"
    assert len(list(thumbs.rglob("*.jpg"))) == 2
    deleted = world.client.delete(
        f"/v1/datasets/{world.dataset_id}", headers={"Authorization": f"Bearer {world.key}"}
    )
    assert deleted.status_code == 204, deleted.text
    assert not thumbs.exists() and not world.dataset_dir().exists()
    assert world.thumb("a", "red.png").status_code == 404


def test_an_image_over_the_pixel_cap_is_never_decoded(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_image_pixels=300 * 300 - 1)  # type: ignore[call-arg]
    key, _, dataset_id = stored_dataset(settings, make_images(tmp_path / "src", 300))
    with TestClient(create_app(settings), base_url="https://testserver") as client:
        assert client.post("/ui/login", data={"api_key": key}, follow_redirects=False).status_code == 303
        assert client.get(f"/ui/datasets/{dataset_id}/thumbs/a/red.png").status_code == 404


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (the peak resident set) of process ``pid``, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def test_a_flood_of_big_thumbnails_keeps_the_api_process_memory_bounded(tmp_path: Path) -> None:
    source = make_images(tmp_path / "src", BIG)
    assert all(p.stat().st_size < 300_000 for p in source.rglob("*.png"))  # small files, big images
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir)  # type: ignore[call-arg]
    key, tenant_id, dataset_id = stored_dataset(settings, source)
    env = child_env(KT_DATA_DIR=str(data_dir), KT_DATABASE_URL=settings.database_url)
    proc, url = start_api(env, tmp_path / "api.log")
    with (
        running(proc),
        httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=FLOOD)) as client,
    ):
        login = client.post("/ui/login", data={"api_key": key}, follow_redirects=False)
        assert login.status_code == 303, login.text
        # the cookie is Secure, which httpx keeps for https: sent by hand, as a browser on 127.0.0.1 does
        cookie = {"Cookie": f"{COOKIE_NAME}={login.cookies[COOKIE_NAME]}"}
        page = client.get(f"/ui/datasets/{dataset_id}", headers=cookie)
        assert page.status_code == 200 and page.text.count("/thumbs/") == 4
        before = memory_kb(proc.pid)

        images = [("a", "red"), ("a", "green"), ("b", "blue"), ("b", "grey")]
        wanted = [images[i % len(images)] for i in range(FLOOD)]

        def fetch(item: tuple[str, str]) -> httpx.Response:
            return client.get(f"/ui/datasets/{dataset_id}/thumbs/{item[0]}/{item[1]}.png", headers=cookie)

        started = time.monotonic()
        with ThreadPoolExecutor(FLOOD) as pool:
            responses = list(pool.map(fetch, wanted))
        elapsed = time.monotonic() - started
        after = memory_kb(proc.pid)
        for (_, colour), response in zip(wanted, responses, strict=True):
            assert response.status_code == 200, (response.status_code, response.text[:200], proc.tail())
            assert_thumbnail_of(response.content, colour)
        growth_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
        print(
            f"\nthumbnail flood: {FLOOD} requests for {len(images)} {BIG}x{BIG} PNGs in {elapsed:.1f} s; "
            f"API VmHWM {before['VmHWM'] / 1024:.0f} -> {after['VmHWM'] / 1024:.0f} MB "
            f"(growth {growth_mb:.0f} MB), VmRSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MB"
        )
        assert growth_mb < MAX_GROWTH_MB, f"the API's peak memory grew {growth_mb:.0f} MB under the flood"
        # and gave it back: the decodes' memory is not kept
        assert (after["VmRSS"] - before["VmRSS"]) / 1024 < 100, (before, after)

        # made once: each image has one cached thumbnail, and a second flood reads only those
        folder = storage.dataset_dir(data_dir, tenant_id, dataset_id)
        made = {thumb_path(folder, cls, f"{n}.png", THUMB_PX) for cls, n in images}
        assert sorted(folder.joinpath("thumbs").rglob("*.jpg")) == sorted(made)
        written = {path: path.stat().st_mtime_ns for path in made}
        with ThreadPoolExecutor(FLOOD) as pool:
            cached = list(pool.map(fetch, wanted))
        assert [r.content for r in cached] == [r.content for r in responses]
        assert {path: path.stat().st_mtime_ns for path in made} == written  # none made again

"""Hostile and odd uploads (the corpus of ``tests/reliability/hostile.py``), each sent over HTTP to
one real uvicorn server (PostgreSQL, a temp ``KT_DATA_DIR``, small limits).

For every case: the status and ``detail`` phrases of the table in ``docs/uploads.md``, no server
path in the message, ``/healthz`` still answers, nothing written outside the data dir (a sentinel
tree beside it is unchanged, and no file named after a zip-slip target exists anywhere it could
land), and a refused upload leaves no dataset row, directory, staging directory or temp file; an
accepted one leaves exactly one, with the expected classes and counts, every image converting to RGB.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import Engine, select

from service.db.models import Dataset
from service.db.session import make_engine
from service.settings import Settings
from tests.reliability.hostile import ODD_MODES, TOPICS, Case, Limits, corpus
from tests.service.conftest import fresh_postgres_database
from tests.service.test_api import Api, running_api

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "uploads.md"
MARK = f"kt-hostile-{uuid.uuid4().hex[:10]}"
LIMITS = Limits(
    max_upload_bytes=2_000_000,
    max_upload_files=200,
    max_image_pixels=1_000_000,
    max_classes=20,
    max_compression_ratio=100,
)
CASES = corpus(LIMITS, MARK)
# PIL warns (in the server's thread) about the images over the pixel limit that the corpus sends
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@dataclass
class Server:
    api: Api
    root: Path  # holds data/ (KT_DATA_DIR) and outside/ (a sentinel tree)
    key: str
    engine: Engine

    @property
    def data_dir(self) -> Path:
        return self.api.settings.data_dir

    def client(self, key: str | None = "") -> httpx.Client:
        return self.api.client(self.key if key == "" else key)

    def rows(self) -> dict[str, Dataset]:
        with self.engine.connect() as conn:
            return {row.id: row for row in conn.execute(select(Dataset))}

    def dataset_dirs(self) -> set[Path]:
        return set(self.data_dir.glob("tenants/*/datasets/*")) | set(
            self.data_dir.glob("tenants/*/datasets/.*")
        )

    def outside(self) -> dict[str, tuple[int, int]]:
        """Every path under ``root`` but outside the data dir, with size and mtime."""
        found = {}
        for path in self.root.rglob("*"):
            if path == self.data_dir or self.data_dir in path.parents:
                continue
            st = path.lstat()
            found[str(path.relative_to(self.root))] = (st.st_size, st.st_mtime_ns)
        return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hostile")
    sentinel = root / "outside" / "nested"
    sentinel.mkdir(parents=True)
    (sentinel / "keep.png").write_bytes(b"sentinel")
    (root / "outside" / "notes.txt").write_text("sentinel\n")
    with fresh_postgres_database("kt_hostile") as database_url:
        settings = Settings(
            data_dir=root / "data",
            database_url=database_url,
            max_upload_bytes=LIMITS.max_upload_bytes,
            max_upload_files=LIMITS.max_upload_files,
            max_image_pixels=LIMITS.max_image_pixels,
            max_classes=LIMITS.max_classes,
            max_compression_ratio=LIMITS.max_compression_ratio,
        )
        with running_api(settings) as api:
            engine = make_engine(database_url)
            try:
                yield Server(api=api, root=root, key=api.key("hostile"), engine=engine)
            finally:
                engine.dispose()


def escaped(server: Server) -> list[Path]:
    """Files named after a zip-slip target, wherever an escaping write could have put them."""
    places = [server.root.parent, Path(tempfile.gettempdir()), Path("/tmp"), Path.cwd(), REPO, Path("/")]
    found = [p for p in server.root.rglob(f"*{MARK}*")]
    for place in places:
        found += [p for p in place.glob(f"*{MARK}*")]
    return found


def check_accepted(server: Server, case: Case, body: dict[str, object], new_rows: dict[str, Dataset]) -> None:
    assert case.counts is not None
    assert body["class_counts"] == case.counts and body["classes"] == sorted(case.counts)
    assert body["num_images"] == sum(case.counts.values()) and body["status"] == "ready"
    if case.name is not None:
        assert body["name"] == case.name
    assert list(new_rows) == [body["id"]], "exactly one new dataset row"
    assert new_rows[str(body["id"])].class_counts == case.counts
    (folder,) = server.data_dir.glob(f"tenants/*/datasets/{body['id']}")
    images = folder / "images"
    stored = {d.name: sorted(f for f in d.iterdir()) for d in images.iterdir()}
    assert {label: len(files) for label, files in stored.items()} == case.counts
    for files in stored.values():
        for f in files:
            assert f.is_file() and not f.is_symlink() and images in f.resolve().parents
            if case.max_name_bytes is not None:
                assert len(f.name.encode()) <= case.max_name_bytes, f.name
    if case.rgb:
        from kt_train.transforms import to_rgb  # what the worker's data loader applies to every image

        for name, want in case.rgb.items():
            path = images / name
            assert path.read_bytes() == ODD_MODES[name][0], f"{name} is stored as uploaded"
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
                got = rgb.getpixel((5, 5))
            assert rgb.mode == "RGB" and isinstance(got, tuple)
            assert all(abs(a - b) <= 8 for a, b in zip(got, want, strict=True)), (name, got, want)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(server: Server, case: Case) -> None:
    rows_before, dirs_before, outside_before = server.rows(), server.dataset_dirs(), server.outside()
    with server.client() as client:
        response = client.request(case.send.method, case.send.path, **case.send.kwargs())
    assert response.status_code == case.status, response.text
    body = response.json()
    rows_after = server.rows()
    new_rows = {k: v for k, v in rows_after.items() if k not in rows_before}
    if case.status == 201:
        check_accepted(server, case, body, new_rows)
    else:
        detail = body.get("detail")
        assert isinstance(detail, str), body
        for needle in case.needles:
            assert needle in detail, f"{needle!r} not in {detail!r}"
        assert str(server.root) not in detail, "the message shows a server path"
        assert rows_after.keys() == rows_before.keys(), "a refused upload left a dataset row"
        assert server.dataset_dirs() == dirs_before, "a refused upload left a dataset directory"
    # the server is healthy and answers the next request at once
    with server.client(None) as anonymous:
        health = anonymous.get("/healthz", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    # nothing written outside the data dir, nothing left behind inside it
    assert server.outside() == outside_before
    assert escaped(server) == []
    tmp = server.data_dir / "tmp"  # made by the first upload: a job case run alone has none
    assert not tmp.exists() or list(tmp.iterdir()) == [], "the received upload was not removed"
    leftovers = [p for p in server.data_dir.glob("tenants/*/datasets/.*")]
    assert leftovers == [], "a staging directory was left behind"


def test_the_corpus_covers_the_issue() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    covered = {c.topic for c in CASES}
    assert set(TOPICS) <= covered, f"topics without a case: {sorted(set(TOPICS) - covered)}"
    accepted = [c for c in CASES if c.status == 201]
    assert len(accepted) >= 5 and all(c.counts for c in accepted)
    assert all(400 <= c.status < 500 and c.needles for c in CASES if c not in accepted)


def documented() -> dict[str, tuple[int, str]]:
    """The policy table of docs/uploads.md: key -> (status, message)."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]) and cells[2].isdigit():
            rows[cells[0].strip("`")] = (int(cells[2]), cells[3].replace("\\|", "|"))
    return rows


def test_every_case_follows_the_documented_policy() -> None:
    table = documented()
    assert len(table) >= 20
    for case in CASES:
        assert case.policy in table, f"{case.id}: no row `{case.policy}` in {DOCS}"
        status, message = table[case.policy]
        assert status == case.status, f"{case.id}: documented {status}, tested {case.status}"
        if case.needles:
            assert case.needles[0] in message, f"{case.id}: {case.needles[0]!r} not in the documented message"
    unused = set(table) - {c.policy for c in CASES}
    assert not unused, f"documented policies no case checks: {sorted(unused)}"


def test_limits_default_to_documented_values() -> None:
    """The defaults the docs quote are the real ones."""
    text = DOCS.read_text()
    for env in ("KT_MAX_CLASSES", "KT_MAX_COMPRESSION_RATIO", "KT_MAX_UPLOAD_FILES", "KT_MAX_IMAGE_PIXELS"):
        value = Settings.model_fields[env.removeprefix("KT_").lower()].default
        assert re.search(rf"`{env}`[^\n]*\b({value}|{value:_})\b", text), (env, value)

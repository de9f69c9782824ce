"""The API contract, table-driven over the app's routes: every ``/v1`` route has a row in ``ROUTES``
(a new route without one fails ``test_every_route_has_a_row``), and for every row:

- its valid request from the owner succeeds (so the failures below come from what each test changes);
- no key, a malformed key and an unknown well-formed key answer 401;
- another tenant's ids (in the path or the body) answer 404, as do unknown ids; listings never
  show another tenant's rows;
- where they apply: 403 (a non-admin key on an admin route), 409 (a resource in the wrong state),
  413 (an upload over the limits) and 422 (bad bodies and out-of-range numbers).

Every error body carries a ``detail`` message that says what to fix. Real uvicorn, SQLite and a
real Redis broker (db 14); no worker runs, so submitted jobs stay queued.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from service.admin import cli, create_tenant_key
from service.app import create_app
from service.db.models import ApiKey, Dataset, Gallery, Job, Model, RegisteredModel, new_id, utcnow
from service.db.session import make_engine, make_session_factory
from tests.service.conftest import flushed_redis
from tests.service.test_api import Api, imagefolder_zip, make_settings, make_zip, running_api, upload

REDIS_URL = os.environ.get("KT_TEST_CONTRACT_REDIS_URL", "redis://127.0.0.1:6379/14")
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"
BAD_KEYS = {
    "missing": None,
    "malformed": "not-a-key",
    "unknown": "kt_0123abcd_" + "x" * 43,
}
# Words of a message that tells the caller what to do; FastAPI's bare defaults ("Not Found",
# "Not authenticated", "Method Not Allowed") have none of them.
FIX_WORDS = (
    "send", "check", "ask", "create", "give", "choose", "wait", "poll", "lists", "upload", "split",
    "cancel", "only", "should", "must", "expected", "remove", "add ", "use ", "submit", "format",
    "attach", "e.g.",
)  # fmt: skip


def assert_explains(response: httpx.Response, status: int, *needles: str) -> str:
    """``response`` has ``status`` and a JSON ``detail`` that says what to fix."""
    assert response.status_code == status, f"{response.status_code} != {status}: {response.text}"
    detail = response.json().get("detail")
    assert isinstance(detail, str) and len(detail) >= 25, f"no readable detail: {response.text}"
    assert any(word in detail.lower() for word in FIX_WORDS), f"does not say what to fix: {detail!r}"
    for needle in needles:
        assert needle in detail, f"{needle!r} not in {detail!r}"
    return detail


# --- the world: two tenants, each resource of the owner in every state the table needs


@dataclass
class World:
    api: Api
    owner: str  # keys
    admin: str  # an admin key of the owner's tenant
    rival: str  # another tenant's key
    rival_admin: str  # an admin key of the other tenant
    ids: dict[str, str] = field(default_factory=dict)
    source_dir: Path = Path()

    def client(self, key: str | None) -> httpx.Client:
        return self.api.client(key)

    def db(self, *rows: Any, statement: Any = None) -> None:
        engine = make_engine(self.api.settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                session.add_all(rows)
                if statement is not None:
                    session.execute(statement)
                session.commit()
        finally:
            engine.dispose()

    def tenant_of(self, key: str) -> str:
        engine = make_engine(self.api.settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                row = session.query(ApiKey).filter(ApiKey.prefix == key.split("_")[1]).one()
                return row.tenant_id
        finally:
            engine.dispose()

    # fresh resources, for requests that change what they touch
    def new_dataset(self) -> str:
        with self.client(self.owner) as client:
            return str(upload(client, imagefolder_zip({"cat": 1, "dog": 1}), name="spare").json()["id"])

    def new_job(self) -> str:
        with self.client(self.owner) as client:
            response = client.post("/v1/jobs", json=job_body(self.ids["dataset"]))
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

    def new_failed_job(self) -> str:
        job_id = self.new_job()
        self.db(statement=update(Job).where(Job.id == job_id).values(status="failed", error="boom"))
        return job_id


def job_body(dataset_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "dataset_id": dataset_id,
        "teacher": "timm:test_vit",
        "student": "timm:resnet10t",
        "steps": {"finetune_teacher": 1, "distill": 1, "finetune_student": 1},
        **extra,
    }


def key_for(api: Api, tenant: str, admin: bool = False) -> str:
    engine = make_engine(api.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return create_tenant_key(session, tenant, admin=admin)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("contract")
    with flushed_redis(REDIS_URL) as redis_url:
        settings = make_settings(
            root / "data", broker_url=redis_url, result_backend=redis_url, gallery_roots=[root / "images"]
        )
        with running_api(settings) as api:
            w = World(
                api=api,
                owner=key_for(api, "owner"),
                admin=key_for(api, "owner", admin=True),
                rival=key_for(api, "rival"),
                rival_admin=key_for(api, "rival", admin=True),
                source_dir=root / "images",
            )
            w.source_dir.mkdir()
            gallery = Gallery(
                name="shared", path="/galleries/shared", size=3, encoder="timm:x", index_kind="flat", dim=8
            )
            w.db(gallery)
            w.ids["gallery"] = gallery.id
            with w.client(w.owner) as client:
                w.ids["dataset"] = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()["id"]
                w.ids["pending_dataset"] = upload(client, imagefolder_zip({"a": 1, "b": 1}), name="p").json()[
                    "id"
                ]
                w.ids["job"] = client.post("/v1/jobs", json=job_body(w.ids["dataset"])).json()["id"]
                w.ids["finished_job"] = client.post("/v1/jobs", json=job_body(w.ids["dataset"])).json()["id"]
                ts_body = {"dataset_id": w.ids["dataset"], "gallery_id": gallery.id, "size": 5}
                w.ids["transfer_set"] = client.post("/v1/transfer-sets", json=ts_body).json()["id"]
                ready = client.post("/v1/transfer-sets", json=ts_body).json()
            w.ids["ready_transfer_set"] = ready["id"]
            w.db(
                statement=update(Dataset)
                .where(Dataset.id == w.ids["pending_dataset"])
                .values(status="uploading")
            )
            w.db(
                statement=update(Job)
                .where(Job.id.in_([w.ids["finished_job"], ready["job_id"]]))
                .values(status="succeeded", finished_at=utcnow())
            )
            out = settings.data_dir / "jobs" / ready["job_id"] / "run" / "curate"
            out.mkdir(parents=True)
            (out / "manifest.jsonl").write_text('{"path": "a.jpg"}\n')
            (out / "report.html").write_text("<html></html>")
            weights = (
                settings.data_dir / "jobs" / w.ids["finished_job"] / "run" / "export" / "model.safetensors"
            )
            weights.parent.mkdir(parents=True)
            weights.write_bytes(b"weights")
            model = Model(
                tenant_id=w.tenant_of(w.owner),
                job_id=w.ids["finished_job"],
                card={"classes": ["cat", "dog"]},
                files={"safetensors": str(weights)},
            )
            w.db(model)
            w.ids["model"] = model.id
            registered = RegisteredModel(
                name="owners-model",
                arch="resnet10t",
                tenant_id=w.tenant_of(w.owner),
                sha256="0" * 64,
                bytes=1,
            )
            w.db(registered)
            w.ids["registered_model"] = registered.id
            yield w


# --- the table


@dataclass(frozen=True)
class Request:
    path: str  # concrete
    json: Any = None
    params: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None

    def send(self, client: httpx.Client, method: str) -> httpx.Response:
        kwargs: dict[str, Any] = {k: v for k, v in vars(self).items() if k not in ("path",) and v is not None}
        return client.request(method, self.path, **kwargs)


Make = Callable[[World], Request]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # the route's template, as in app.routes
    ok: Make  # a valid request by the owner (the admin key on admin routes)
    ok_status: int = 200
    owned: bool = True  # ``ok`` names the owner's ids: another tenant gets 404
    unknown: Make | None = None  # the same request with unknown ids: 404
    hidden: str | None = None  # a listing: the ids key of an owner's row other tenants must not see
    admin: bool = False
    public: bool = False
    conflict: tuple[Make, ...] = ()  # 409
    too_large: tuple[Make, ...] = ()  # 413
    invalid: tuple[Make, ...] = ()  # 422


def zip_upload(data: bytes, name: str = "d") -> Request:
    return Request("/v1/datasets", files={"file": ("d.zip", data, "application/zip")}, data={"name": name})


def gallery_build(w: World, key_dataset: str | None = None, **extra: Any) -> Request:
    body = {
        "name": f"g-{new_id()[:8]}",
        "sources": [{"path": str(w.source_dir)}, {"dataset_id": key_dataset or w.ids["dataset"]}],
        "encoder": "timm:test_efficientnet",
        "image_size": 32,
        **extra,
    }
    return Request("/v1/admin/galleries", json=body)


def transfer_set_with(change: dict[str, Any]) -> Make:
    def make(w: World) -> Request:
        body = {"dataset_id": w.ids["dataset"], "gallery_id": w.ids["gallery"], **change}
        return Request("/v1/transfer-sets", json=body)

    return make


def bad_limit(path: str) -> tuple[Make, ...]:
    return (
        lambda w: Request(path, params={"limit": 0}),
        lambda w: Request(path, params={"limit": 1001}),
        lambda w: Request(path, params={"offset": -1}),
    )


ROUTES: list[Route] = [
    Route(
        "POST",
        "/v1/datasets",
        ok=lambda w: zip_upload(imagefolder_zip({"a": 1, "b": 1})),
        ok_status=201,
        owned=False,
        too_large=(
            lambda w: zip_upload(os.urandom(300_000)),  # over KT_MAX_UPLOAD_BYTES (200 kB here)
            lambda w: zip_upload(make_zip({f"c/{i}.png": b"x" for i in range(60)})),  # over 50 files
        ),
        invalid=(
            lambda w: Request("/v1/datasets", json={"file": "dataset.zip"}),  # not multipart
            lambda w: zip_upload(imagefolder_zip({"a": 1, "b": 1}), name="n" * 201),
            lambda w: Request("/v1/datasets", files={"other": ("d.zip", b"PK", "application/zip")}),
        ),
    ),
    Route(
        "GET",
        "/v1/datasets",
        ok=lambda w: Request("/v1/datasets"),
        owned=False,
        hidden="dataset",
        invalid=bad_limit("/v1/datasets"),
    ),
    Route(
        "GET",
        "/v1/datasets/{dataset_id}",
        ok=lambda w: Request(f"/v1/datasets/{w.ids['dataset']}"),
        unknown=lambda w: Request(f"/v1/datasets/{UNKNOWN_ID}"),
    ),
    Route(
        "DELETE",
        "/v1/datasets/{dataset_id}",
        ok=lambda w: Request(f"/v1/datasets/{w.new_dataset()}"),
        ok_status=204,
        unknown=lambda w: Request(f"/v1/datasets/{UNKNOWN_ID}"),
        conflict=(lambda w: Request(f"/v1/datasets/{w.ids['dataset']}"),),  # a queued job reads it
    ),
    Route(
        "POST",
        "/v1/jobs",
        ok=lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"])),
        ok_status=202,
        unknown=lambda w: Request("/v1/jobs", json=job_body(UNKNOWN_ID)),
        conflict=(
            lambda w: Request("/v1/jobs", json=job_body(w.ids["pending_dataset"])),
            lambda w: Request(
                "/v1/jobs", json=job_body(w.ids["dataset"], transfer_set_id=w.ids["transfer_set"])
            ),
        ),
        invalid=(
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], budget="huge")),
            lambda w: Request(
                "/v1/jobs", json=job_body(w.ids["dataset"], recipe={"distill": {"temperature": 0}})
            ),
            lambda w: Request(
                "/v1/jobs", json=job_body(w.ids["dataset"], image_size=64, teacher_image_size=64)
            ),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], steps={"distill": -1})),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], steps={"distill": 10**9})),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], image_size=8)),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], teacher="resnet18")),
            lambda w: Request(
                "/v1/jobs", json=job_body(w.ids["dataset"], teacher="timm:resnet18@/etc/passwd")
            ),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], teacher="timm:resnet_18")),
            lambda w: Request(
                "/v1/jobs", json=job_body(w.ids["dataset"], teacher="timm:resnet10t@registered:nobodys")
            ),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], device="tpu")),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], export_formats=["tflite"])),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], student="hf-hub:timm/resnet18")),
            lambda w: Request(
                "/v1/jobs", json=job_body(w.ids["dataset"], webhook_url="http://example.com/h")
            ),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], webhook_url="https://10.0.0.1/h")),
            lambda w: Request("/v1/jobs", json=job_body(w.ids["dataset"], surprise=1)),
            lambda w: Request("/v1/jobs", json={}),
            lambda w: Request("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
        ),
    ),
    Route(
        "GET",
        "/v1/jobs",
        ok=lambda w: Request("/v1/jobs"),
        owned=False,
        hidden="job",
        invalid=(*bad_limit("/v1/jobs"), lambda w: Request("/v1/jobs", params={"status": "sleeping"})),
    ),
    Route(
        "GET",
        "/v1/jobs/{job_id}",
        ok=lambda w: Request(f"/v1/jobs/{w.ids['job']}"),
        unknown=lambda w: Request(f"/v1/jobs/{UNKNOWN_ID}"),
    ),
    Route(
        "POST",
        "/v1/jobs/{job_id}/cancel",
        ok=lambda w: Request(f"/v1/jobs/{w.new_job()}/cancel"),
        unknown=lambda w: Request(f"/v1/jobs/{UNKNOWN_ID}/cancel"),
        conflict=(lambda w: Request(f"/v1/jobs/{w.ids['finished_job']}/cancel"),),
    ),
    Route(
        "POST",
        "/v1/jobs/{job_id}/retry",
        ok=lambda w: Request(f"/v1/jobs/{w.new_failed_job()}/retry"),
        ok_status=202,
        unknown=lambda w: Request(f"/v1/jobs/{UNKNOWN_ID}/retry"),
        conflict=(
            lambda w: Request(f"/v1/jobs/{w.ids['finished_job']}/retry"),  # succeeded
            lambda w: Request(f"/v1/jobs/{w.ids['job']}/retry"),  # queued
        ),
    ),
    Route(
        "GET",
        "/v1/jobs/estimate",
        ok=lambda w: Request("/v1/jobs/estimate", params={"budget": "fast"}),
        owned=False,
        invalid=(
            lambda w: Request("/v1/jobs/estimate", params={"budget": "slowest"}),
            lambda w: Request("/v1/jobs/estimate", params={"distill_steps": -1}),
        ),
    ),
    Route(
        "GET",
        "/v1/jobs/{job_id}/events",
        ok=lambda w: Request(f"/v1/jobs/{w.ids['finished_job']}/events"),  # a finished job's stream ends
        unknown=lambda w: Request(f"/v1/jobs/{UNKNOWN_ID}/events"),
        invalid=(
            lambda w: Request(f"/v1/jobs/{w.ids['finished_job']}/events", params={"poll_s": 0}),
            lambda w: Request(f"/v1/jobs/{w.ids['finished_job']}/events", params={"poll_s": 61}),
        ),
    ),
    Route(
        "GET",
        "/v1/jobs/{job_id}/logs",
        ok=lambda w: Request(f"/v1/jobs/{w.ids['job']}/logs"),
        unknown=lambda w: Request(f"/v1/jobs/{UNKNOWN_ID}/logs"),
    ),
    Route(
        "POST",
        "/v1/transfer-sets",
        ok=lambda w: Request(
            "/v1/transfer-sets", json={"dataset_id": w.ids["dataset"], "gallery_id": w.ids["gallery"]}
        ),
        ok_status=202,
        unknown=lambda w: Request(
            "/v1/transfer-sets", json={"dataset_id": w.ids["dataset"], "gallery_id": UNKNOWN_ID}
        ),
        conflict=(
            lambda w: Request(
                "/v1/transfer-sets",
                json={"dataset_id": w.ids["pending_dataset"], "gallery_id": w.ids["gallery"]},
            ),
        ),
        invalid=tuple(
            transfer_set_with(change)
            for change in (
                {"size": 0},
                {"size": 10**7},
                {"crops": -1},
                {"dedup_threshold": 2},
                {"method": "magic"},
            )
        ),
    ),
    Route(
        "GET",
        "/v1/transfer-sets",
        ok=lambda w: Request("/v1/transfer-sets"),
        owned=False,
        hidden="transfer_set",
        invalid=bad_limit("/v1/transfer-sets"),
    ),
    Route(
        "GET",
        "/v1/transfer-sets/{transfer_set_id}",
        ok=lambda w: Request(f"/v1/transfer-sets/{w.ids['transfer_set']}"),
        unknown=lambda w: Request(f"/v1/transfer-sets/{UNKNOWN_ID}"),
    ),
    Route(
        "GET",
        "/v1/transfer-sets/{transfer_set_id}/manifest",
        ok=lambda w: Request(f"/v1/transfer-sets/{w.ids['ready_transfer_set']}/manifest"),
        unknown=lambda w: Request(f"/v1/transfer-sets/{UNKNOWN_ID}/manifest"),
        conflict=(lambda w: Request(f"/v1/transfer-sets/{w.ids['transfer_set']}/manifest"),),
        invalid=(
            lambda w: Request(
                f"/v1/transfer-sets/{w.ids['ready_transfer_set']}/manifest", params={"format": "xml"}
            ),
        ),
    ),
    Route(
        "GET",
        "/v1/transfer-sets/{transfer_set_id}/report",
        ok=lambda w: Request(f"/v1/transfer-sets/{w.ids['ready_transfer_set']}/report"),
        unknown=lambda w: Request(f"/v1/transfer-sets/{UNKNOWN_ID}/report"),
        conflict=(lambda w: Request(f"/v1/transfer-sets/{w.ids['transfer_set']}/report"),),
    ),
    Route(
        "GET",
        "/v1/galleries",
        ok=lambda w: Request("/v1/galleries"),
        owned=False,
        invalid=bad_limit("/v1/galleries"),
    ),
    Route(
        "GET",
        "/v1/models",
        ok=lambda w: Request("/v1/models"),
        owned=False,
        hidden="model",
        invalid=bad_limit("/v1/models"),
    ),
    Route(
        "GET",
        "/v1/models/{model_id}",
        ok=lambda w: Request(f"/v1/models/{w.ids['model']}"),
        unknown=lambda w: Request(f"/v1/models/{UNKNOWN_ID}"),
    ),
    Route(
        "GET",
        "/v1/models/{model_id}/download",
        ok=lambda w: Request(f"/v1/models/{w.ids['model']}/download", params={"format": "safetensors"}),
        unknown=lambda w: Request(f"/v1/models/{UNKNOWN_ID}/download"),
        invalid=(lambda w: Request(f"/v1/models/{w.ids['model']}/download", params={"format": "pkl"}),),
    ),
    Route(
        "POST",
        "/v1/admin/galleries",
        ok=gallery_build,
        ok_status=202,
        admin=True,
        unknown=lambda w: gallery_build(w, key_dataset=UNKNOWN_ID),
        conflict=(
            lambda w: Request("/v1/admin/galleries", json={**gallery_build(w).json, "name": "shared"}),
        ),
        invalid=(
            lambda w: Request("/v1/admin/galleries", json={**gallery_build(w).json, "sources": []}),
            lambda w: Request(
                "/v1/admin/galleries", json={**gallery_build(w).json, "sources": [{"path": "rel/dir"}]}
            ),
            lambda w: Request(
                "/v1/admin/galleries", json={**gallery_build(w).json, "sources": [{"path": "/no/such/dir"}]}
            ),
            lambda w: Request(
                "/v1/admin/galleries", json={**gallery_build(w).json, "sources": [{"path": "/a/../etc"}]}
            ),
            lambda w: Request(
                "/v1/admin/galleries",
                json={
                    **gallery_build(w).json,
                    "sources": [{"path": str(w.source_dir), "dataset_id": w.ids["dataset"]}],
                },
            ),
            lambda w: Request(  # every tenant's uploads: read by dataset_id, never by path
                "/v1/admin/galleries",
                json={
                    **gallery_build(w).json,
                    "sources": [{"path": str(w.api.settings.data_dir / "tenants")}],
                },
            ),
            lambda w: Request(  # outside KT_GALLERY_ROOTS
                "/v1/admin/galleries",
                json={**gallery_build(w).json, "sources": [{"path": str(Path(__file__).parent)}]},
            ),
            lambda w: Request("/v1/admin/galleries", json={**gallery_build(w).json, "name": "../etc"}),
            lambda w: Request("/v1/admin/galleries", json={**gallery_build(w).json, "encoder": "clip"}),
            lambda w: Request(
                "/v1/admin/galleries",
                json={**gallery_build(w).json, "encoder": "open_clip:ViT-B-32@secret.txt"},
            ),
            lambda w: Request("/v1/admin/galleries", json={**gallery_build(w).json, "batch_size": 0}),
            lambda w: Request("/v1/admin/galleries", json={**gallery_build(w).json, "index_kind": "lsh"}),
        ),
    ),
    Route(
        "GET",
        "/v1/registered-models",
        ok=lambda w: Request("/v1/registered-models"),
        owned=False,
        hidden="registered_model",
        invalid=bad_limit("/v1/registered-models"),
    ),
    Route("GET", "/v1/openapi.json", ok=lambda w: Request("/v1/openapi.json"), owned=False, public=True),
]
BY_ID = {f"{r.method} {r.path}": r for r in ROUTES}


def rows(predicate: Callable[[Route], bool] = lambda r: True) -> list[Any]:
    return [pytest.param(r, id=f"{r.method} {r.path}") for r in ROUTES if predicate(r)]


def cases(attr: str) -> list[Any]:
    return [
        pytest.param(r, i, id=f"{r.method} {r.path} #{i}")
        for r in ROUTES
        for i in range(len(getattr(r, attr)))
    ]


def owner_key(w: World, route: Route) -> str:
    return w.admin if route.admin else w.owner


# --- the tests


def test_every_route_has_a_row(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "data"), migrate=False)
    # FastAPI >= 0.165 keeps included routers as such in app.routes; this flattens them
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(flatten(app.routes)) if flatten is not None else app.routes
    served = {
        f"{method} {route.path}"
        for route in routes
        if (getattr(route, "path", None) or "").startswith("/v1")
        for method in (getattr(route, "methods", None) or ())
        if method != "HEAD"
    }
    assert len(served) >= 20
    assert served == set(BY_ID), (
        f"routes without a row in ROUTES: {sorted(served - set(BY_ID))}; "
        f"rows without a route: {sorted(set(BY_ID) - served)}"
    )
    # every row that names ids checks them against unknown ids too
    assert all(r.unknown is not None for r in ROUTES if "{" in r.path)


@pytest.mark.parametrize("route", rows())
def test_the_valid_request_succeeds(world: World, route: Route) -> None:
    with world.client(None if route.public else owner_key(world, route)) as client:
        response = route.ok(world).send(client, route.method)
    assert response.status_code == route.ok_status, response.text


@pytest.mark.parametrize("bad", list(BAD_KEYS))
@pytest.mark.parametrize("route", rows(lambda r: not r.public))
def test_without_a_valid_key_401(world: World, route: Route, bad: str) -> None:
    with world.client(BAD_KEYS[bad]) as client:
        response = route.ok(world).send(client, route.method)
    assert_explains(response, 401, "API key")
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", rows(lambda r: r.owned))
def test_another_tenants_ids_and_unknown_ids_404(world: World, route: Route) -> None:
    with world.client(world.rival_admin if route.admin else world.rival) as client:
        rival = route.ok(world).send(client, route.method)
    assert_explains(rival, 404, "not found", "GET /v1/")
    assert route.unknown is not None
    with world.client(owner_key(world, route)) as client:
        unknown = route.unknown(world).send(client, route.method)
    assert_explains(unknown, 404, UNKNOWN_ID, "GET /v1/")
    # the same kind of answer whether the id exists elsewhere or nowhere: ids don't leak
    assert set(rival.json()) == set(unknown.json()) == {"detail"}


@pytest.mark.parametrize("route", rows(lambda r: r.hidden is not None))
def test_listings_show_only_the_tenants_own_rows(world: World, route: Route) -> None:
    assert route.hidden is not None
    hidden = world.ids[route.hidden]
    with world.client(world.owner) as client:
        mine = route.ok(world).send(client, route.method).json()
    with world.client(world.rival) as client:
        theirs = route.ok(world).send(client, route.method).json()
    assert hidden in [row["id"] for row in mine["data"]]
    assert hidden not in [row["id"] for row in theirs["data"]] and theirs["count"] < mine["count"]


@pytest.mark.parametrize("route", rows(lambda r: r.admin))
def test_admin_routes_refuse_other_keys_403(world: World, route: Route) -> None:
    with world.client(world.owner) as client:
        response = route.ok(world).send(client, route.method)
    assert_explains(response, 403, "admin API key", "create-key --tenant NAME --admin")


@pytest.mark.parametrize(("route", "i"), cases("conflict"))
def test_conflicts_409(world: World, route: Route, i: int) -> None:
    with world.client(owner_key(world, route)) as client:
        assert_explains(route.conflict[i](world).send(client, route.method), 409)


@pytest.mark.parametrize(("route", "i"), cases("too_large"))
def test_too_large_413(world: World, route: Route, i: int) -> None:
    with world.client(owner_key(world, route)) as client:
        detail = assert_explains(route.too_large[i](world).send(client, route.method), 413)
    assert "limit" in detail


@pytest.mark.parametrize(("route", "i"), cases("invalid"))
def test_invalid_requests_422(world: World, route: Route, i: int) -> None:
    with world.client(owner_key(world, route)) as client:
        assert_explains(route.invalid[i](world).send(client, route.method), 422)


def test_the_table_finds_each_status_it_claims() -> None:
    """Guards the table itself: each status has rows to check."""
    assert sum(len(r.conflict) for r in ROUTES) >= 6
    assert sum(len(r.invalid) for r in ROUTES) >= 30
    assert sum(len(r.too_large) for r in ROUTES) == 2
    assert [r.path for r in ROUTES if r.admin] == ["/v1/admin/galleries"]


# --- the admin mechanism


def test_admin_cli_creates_admin_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    plain = runner.invoke(cli, ["create-key", "--tenant", "ops"])
    admin = runner.invoke(cli, ["create-key", "--tenant", "ops", "--admin"])
    assert plain.exit_code == 0 and admin.exit_code == 0, (plain.output, admin.output)
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'kt.db'}")
    try:
        with make_session_factory(engine)() as session:
            flags = {row.prefix: row.is_admin for row in session.query(ApiKey).all()}
    finally:
        engine.dispose()
    assert flags == {plain.output.strip().split("_")[1]: False, admin.output.strip().split("_")[1]: True}


def test_error_bodies_are_json_objects_with_detail(world: World) -> None:
    """A sample of every status through one client: the body is ``{"detail": "..."}`` (422 adds the
    machine-readable ``errors``)."""
    with world.client(world.owner) as client:
        bodies = [
            client.get("/v1/jobs/nope").json(),
            client.get("/v1/jobs", params={"limit": 0}).json(),
        ]
    assert set(bodies[0]) == {"detail"} and set(bodies[1]) == {"detail", "errors"}
    assert json.dumps(bodies)  # plain JSON


def test_paths_and_methods_no_route_serves(world: World) -> None:
    with world.client(world.owner) as client:
        assert_explains(client.get("/v1/nothing-here"), 404, "GET /v1/nothing-here", "/docs")
        assert_explains(client.put("/v1/jobs"), 405, "PUT", "/docs")

"""The curation report is served with the same protective headers on ``/v1`` and ``/ui``: a CSP that
lets it load nothing (its images are data: URIs, its code inline), ``nosniff``, no shared caching.
``/v1/transfer-sets/{id}/report`` used to send none of them, through a real uvicorn server."""

from __future__ import annotations

from pathlib import Path

import httpx

from service.api.routes.transfer_sets import curate_dir
from service.app import create_app
from service.db.models import Dataset, Gallery, Job, Tenant, TransferSet
from service.db.session import make_engine, make_session_factory
from service.settings import Settings
from service.ui.auth import COOKIE_NAME
from tests.service.test_api import Api, serve

REPORT = "<!doctype html><html><body><h1>report</h1><img src='data:image/png;base64,AA=='></body></html>"


def ready_transfer_set(settings: Settings, tenant_name: str) -> str:
    """A ready transfer set of ``tenant_name`` whose curation job wrote ``report.html``; its id."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as s:
            tenant = s.query(Tenant).filter_by(name=tenant_name).one()
            ds = Dataset(tenant_id=tenant.id, name="d", status="ready", classes=["a", "b"])
            gallery = Gallery(name="g", path="/nowhere", size=1, encoder="timm:x", index_kind="flat", dim=8)
            job = Job(tenant_id=tenant.id, kind="curate", status="succeeded")
            s.add_all([ds, gallery, job])
            s.flush()
            ts = TransferSet(tenant_id=tenant.id, dataset_id=ds.id, gallery_id=gallery.id, job_id=job.id)
            s.add(ts)
            s.commit()
            out = curate_dir(settings, job.id)
            out.mkdir(parents=True)
            (out / "report.html").write_text(REPORT)
            return ts.id
    finally:
        engine.dispose()


def test_the_v1_report_has_the_ui_reports_csp_and_nosniff(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")  # type: ignore[call-arg]
    with serve(create_app(settings)) as url:
        api = Api(url, settings)
        key = api.key("acme")
        ts_id = ready_transfer_set(settings, "acme")
        with api.client(key) as client:
            v1 = client.get(f"/v1/transfer-sets/{ts_id}/report")
        assert v1.status_code == 200 and v1.text == REPORT
        assert v1.headers["content-type"] == "text/html; charset=utf-8"
        csp = v1.headers.get("content-security-policy", "")
        assert csp.startswith("default-src 'none'; img-src data:"), csp
        assert "frame-ancestors 'self'" in csp
        assert v1.headers.get("x-content-type-options") == "nosniff"
        assert v1.headers.get("cache-control") == "private, no-cache"

        # the /ui route answers the same file with the same headers
        with httpx.Client(base_url=url, timeout=30) as browser:
            login = browser.post("/ui/login", data={"api_key": key}, follow_redirects=False)
            assert login.status_code == 303, login.text
            # the cookie is Secure, which httpx keeps for https: sent by hand, as a browser on 127.0.0.1 does
            cookie = {"Cookie": f"{COOKIE_NAME}={login.cookies[COOKIE_NAME]}"}
            ui = browser.get(f"/ui/transfer-sets/{ts_id}/report", headers=cookie)
        assert ui.status_code == 200 and ui.text == REPORT
        for header in ("content-security-policy", "x-content-type-options", "cache-control", "content-type"):
            assert ui.headers.get(header) == v1.headers.get(header), header

"""The API freezes its startup objects out of the garbage collector's sight (``gc.freeze``), so a
full collection does not pause requests for tens of milliseconds scanning modules and routes."""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def test_startup_freezes_the_objects_that_live_as_long_as_the_process(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data"))  # type: ignore[call-arg]
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        # the modules, the app and its routes: tens of thousands of objects, none scanned again
        assert gc.get_freeze_count() > 20_000

"""The ``kt`` console script: library commands and service commands in one CLI."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from kt_client.cli import app

runner = CliRunner()


def test_kt_lists_library_and_service_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0, res.output
    for cmd in ("train", "config", "demo", "predict", "curate", "gallery", "serve", "admin"):
        assert f"  {cmd} " in res.output, cmd


def test_kt_serve_passes_its_options_through(tmp_path: Path) -> None:
    kt_before = {k: v for k, v in os.environ.items() if k.startswith("KT_")}
    res = runner.invoke(app, ["serve", "--print-env", "--data-dir", str(tmp_path / "d"), "--port", "9"])
    assert res.exit_code == 0, res.output
    assert f"KT_DATA_DIR={tmp_path / 'd'}" in res.output and "KT_API_PORT=9" in res.output
    # in-process, it leaves this process's environment as it was (a KT_DATABASE_URL or
    # KT_BROKER_URL left behind pointed later tests' apps at this test's deleted files)
    assert {k: v for k, v in os.environ.items() if k.startswith("KT_")} == kt_before
    bad = runner.invoke(app, ["serve", "--port", "notaport"])
    assert bad.exit_code != 0


def test_kt_admin_create_key_through_the_console_script(tmp_path: Path) -> None:
    db = tmp_path / "kt.db"
    env = {**os.environ, "KT_DATABASE_URL": f"sqlite:///{db}", "KT_DATA_DIR": str(tmp_path / "data")}
    kt = Path(sys.executable).with_name("kt")
    out = subprocess.run(
        [str(kt), "admin", "create-key", "--tenant", "acme"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("kt_")
    with sqlite3.connect(db) as con:
        rows = con.execute("select key_hash from api_keys").fetchall()
    assert len(rows) == 1 and key not in rows[0][0]  # stored hashed, never in clear

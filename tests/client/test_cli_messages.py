"""Mistakes a `kt` user makes surface early, with a message that names the fix (issue 13 item 5):
not logged in, an unknown model name (the server's did-you-mean), the API's route hints written as
`kt` commands, runtime failures on their own exit code (6, never the usage code 2), `kt --version`,
tables that keep ids whole at 80 and 120 columns, and `show` commands that print nested values as
`key: value` lines.

Most tests put an ``httpx.MockTransport`` under the real ``Client`` (no server needed); the ones
that check the server's own words use the embedded server of conftest.py."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from kt_client.cli import app
from kt_client.remote import EXIT_API_ERROR, EXIT_AUTH, EXIT_RUNTIME, EXIT_UNREACHABLE, cli_hint
from service.demo import free_port
from tests.client.conftest import Server

runner = CliRunner()


def kt(*args: str) -> Any:
    return runner.invoke(app, list(args))


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No KT_* settings and an empty private config dir: a user who never ran `kt login`."""
    import os

    for name in [k for k in os.environ if k.startswith("KT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KT_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path / "config"


Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def fake_server(offline_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Handler], None]]:
    """``fake_server(handler)``: the `kt` commands' real ``Client`` answered by ``handler``."""
    import kt_client.client

    monkeypatch.setenv("KT_API_URL", "http://kt.invalid:8000")
    monkeypatch.setenv("KT_API_KEY", "kt_abcdefgh_secret")

    def install(handler: Handler) -> None:
        real = kt_client.client.Client
        monkeypatch.setattr(
            kt_client.client, "Client", functools.partial(real, transport=httpx.MockTransport(handler))
        )

    yield install


def _id() -> str:
    return uuid.uuid4().hex


# --- not logged in, unreachable


def test_not_logged_in_says_run_kt_login_and_exits_5(offline_env: Path, monkeypatch: Any) -> None:
    for args in (["datasets", "list"], ["jobs", "submit", "ds", "--student", "timm:resnet18"]):
        res = kt(*args)
        assert res.exit_code == EXIT_AUTH, (args, res.stderr)
        assert "not logged in: run `kt login URL --key KEY`" in res.stderr
        assert "Cannot reach" not in res.stderr
    # a URL without a key is not a login either; nothing is sent to it
    monkeypatch.setenv("KT_API_URL", f"http://127.0.0.1:{free_port()}")
    res = kt("jobs", "list")
    assert res.exit_code == EXIT_AUTH and "not logged in" in res.stderr


def test_login_takes_the_url_as_an_argument_and_a_missing_key_is_a_usage_error(offline_env: Path) -> None:
    res = kt("login", "http://127.0.0.1:1")
    assert res.exit_code == 2 and "`kt login URL --key KEY`" in res.stderr
    res = kt("login", "http://a:1", "--url", "http://b:1", "--key", "k")
    assert res.exit_code == 2 and "two URLs" in res.stderr
    res = kt("login", "http://127.0.0.1:8000", "--key", "kt_x_y", "--no-verify", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["url"] == "http://127.0.0.1:8000"
    saved = json.loads((offline_env / "credentials.json").read_text())
    assert saved == {"url": "http://127.0.0.1:8000", "api_key": "kt_x_y"}


def test_a_login_url_without_its_scheme_is_a_usage_error(offline_env: Path) -> None:
    # `kt login 127.0.0.1:8000` said "Cannot reach the vfm-kt server ... missing an 'http://'" (exit 3)
    res = kt("login", "127.0.0.1:8000", "--key", "kt_abcdefgh_secret")
    assert res.exit_code == 2, res.stderr
    assert "`kt login http://127.0.0.1:8000 --key KEY`" in res.stderr and "Cannot reach" not in res.stderr
    assert not (offline_env / "credentials.json").exists()


def test_download_in_a_format_that_is_not_exported_names_the_conversion(fake_server: Any) -> None:
    # `kt models download ID --format tflite` answered "Invalid request: query.format: Input should be ..."
    sent: list[httpx.Request] = []
    fake_server(lambda req: sent.append(req) or httpx.Response(500))
    res = kt("models", "download", "m1", "--format", "tflite")
    text = " ".join(res.stderr.split())
    assert res.exit_code == 2 and "onnx2tf -i model.onnx" in text, res.stderr
    assert "`kt models download m1 --format safetensors|onnx|torchscript`" in text and "query." not in text
    res = kt("models", "download", "m1", "--format", "onx")
    assert res.exit_code == 2 and "unknown format 'onx'" in res.stderr
    assert not sent  # refused before any request


def test_an_unreachable_server_names_the_url_it_tried_and_where_it_came_from(
    offline_env: Path, monkeypatch: Any
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("KT_API_URL", url)
    monkeypatch.setenv("KT_API_KEY", "kt_abcdefgh_secret")
    res = kt("datasets", "list")
    assert res.exit_code == EXIT_UNREACHABLE
    assert f"Cannot reach the vfm-kt server at {url}" in res.stderr
    assert "the URL is from KT_API_URL" in res.stderr
    # from the saved login
    monkeypatch.delenv("KT_API_URL")
    monkeypatch.delenv("KT_API_KEY")
    assert kt("login", url, "--key", "kt_abcdefgh_secret", "--no-verify").exit_code == 0
    res = kt("models", "list")
    assert res.exit_code == EXIT_UNREACHABLE
    assert url in res.stderr and "the saved login" in res.stderr


# --- runtime failures: exit 6


def test_a_server_error_exits_6_not_2(fake_server: Any) -> None:
    fake_server(lambda req: httpx.Response(503, json={"detail": "The database is unavailable; retry."}))
    res = kt("jobs", "list")
    assert res.exit_code == EXIT_RUNTIME
    assert "Error: the server failed: The database is unavailable; retry. (HTTP 503)" in res.stderr


def test_a_download_that_breaks_off_exits_6_and_saves_nothing(fake_server: Any, tmp_path: Path) -> None:
    class BrokenStream(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"x" * 1000
            raise httpx.ReadError("connection reset by peer")

    fake_server(lambda req: httpx.Response(200, stream=BrokenStream()))
    out = tmp_path / "m.onnx"
    res = kt("models", "download", "m1", "--format", "onnx", "-o", str(out))
    assert res.exit_code == EXIT_RUNTIME, res.stderr
    assert "broke off after 1000 bytes" in res.stderr and "run it again" in res.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part


def test_an_answer_that_is_not_json_exits_6(fake_server: Any) -> None:
    fake_server(lambda req: httpx.Response(200, text="<html>a proxy's login page</html>"))
    res = kt("datasets", "list")
    assert res.exit_code == EXIT_RUNTIME
    assert "not the vfm-kt API's JSON" in res.stderr and "is the URL right?" in res.stderr


def test_a_job_that_failed_exits_4(fake_server: Any) -> None:
    job = {"id": "j1", "status": "failed", "stage": "distill", "progress": 0.4, "error": "CUDA out of memory"}
    fake_server(lambda req: httpx.Response(200, json=job))
    res = kt("jobs", "watch", "j1")
    assert res.exit_code == 4 and "Job j1 failed: CUDA out of memory" in res.stderr


def test_exit_codes_are_documented() -> None:
    text = " ".join(kt("--help").stdout.split())
    for code in (
        "0 ok",
        "1 the server refused",
        "2 usage",
        "3 cannot reach",
        "4 the job failed",
        "5 not logged in",
    ):
        assert code in text, code
    assert "6 the server failed (5xx), a download broke off" in text
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "| 5 | not logged in" in readme and "| 6 | runtime failure: the server failed (5xx)" in readme


# --- version


def test_kt_version_prints_the_version_and_exits_0() -> None:
    from importlib.metadata import version

    import kt_train

    res = kt("--version")
    assert res.exit_code == 0
    assert res.stdout.strip() == f"kt (vfm-kt) {version('vfm-kt')}"
    assert version("vfm-kt") == kt_train.__version__


# --- the server's own messages


def test_hints_name_kt_commands_instead_of_http_routes() -> None:
    assert cli_hint("Dataset 'x' not found; `GET /v1/datasets` lists your datasets.") == (
        "Dataset 'x' not found; `kt datasets list` lists your datasets."
    )
    assert cli_hint("not found; `kt transfer-sets list` (GET /v1/transfer-sets) lists yours") == (
        "not found; `kt transfer-sets list` lists yours"
    )
    assert (
        cli_hint("cancel it (`POST /v1/jobs/ab12/cancel`), then") == "cancel it (`kt jobs cancel ab12`), then"
    )
    assert (
        cli_hint("retry it with POST /v1/jobs/ab12/retry once") == "retry it with `kt jobs retry ab12` once"
    )
    assert cli_hint("poll it with `GET /v1/jobs/{job_id}`.") == "poll it with `kt jobs show JOB_ID`."
    assert cli_hint("`GET /v1/registered-models` lists them") == "`kt registered-models list` lists them"
    # a route with no `kt` command stays as it is
    assert cli_hint("`POST /v1/admin/galleries` builds one") == "`POST /v1/admin/galleries` builds one"


def test_registered_models_list_shows_the_specs_to_name_as_a_teacher(
    fake_server: Any, monkeypatch: Any
) -> None:
    rows = [
        {
            "id": _id(), "name": "proxy", "arch": "mobilenetv2_100", "spec": "timm:mobilenetv2_100@registered:proxy",
            "norm_eval": True, "input_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "bytes": 14184496,
            "sha256": "a5" * 32, "shared": True, "created_at": "2024-05-01T12:34:56",
        }
    ]  # fmt: skip
    seen: list[str] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req.url.path)
        return httpx.Response(200, json={"data": rows, "count": len(rows)})

    fake_server(answer)
    monkeypatch.setenv("COLUMNS", "80")
    res = kt("registered-models", "list")
    assert res.exit_code == 0, res.stderr
    assert seen == ["/v1/registered-models"]
    assert "timm:mobilenetv2_100@registered:proxy" in res.stdout  # whole: pasted into --teacher
    assert json.loads(kt("registered-models", "list", "--json").stdout) == rows
    rows.clear()
    res = kt("registered-models", "list")
    assert res.exit_code == 0 and "kt admin register-model" in res.stderr


def test_a_404_names_the_kt_command_that_lists_the_ids(server: Server, kt_env: dict[str, str]) -> None:
    resp = httpx.get(f"{server.url}/v1/datasets/nope", headers={"Authorization": f"Bearer {server.key}"})
    assert resp.status_code == 404 and "`GET /v1/datasets`" in resp.json()["detail"]  # the API: routes
    res = kt("datasets", "show", "nope")
    assert res.exit_code == EXIT_API_ERROR
    assert (
        res.stderr.strip()
        == "Error: Dataset 'nope' not found; `kt datasets list` lists your datasets. (HTTP 404)"
    )
    res = kt("jobs", "show", "nope")
    assert res.exit_code == EXIT_API_ERROR and "`kt jobs list` lists your jobs" in res.stderr


def test_an_unknown_student_is_refused_at_submit_with_a_did_you_mean(
    server: Server, kt_env: dict[str, str]
) -> None:
    res = kt("jobs", "submit", "any-dataset", "--student", "timm:resnet_18")
    assert res.exit_code == EXIT_API_ERROR
    assert "did you mean resnet18" in res.stderr
    (line,) = res.stderr.strip().splitlines()  # one line: the message, no traceback, no JSON
    assert line.startswith("Error: Invalid request: ") and line.endswith("(HTTP 422)")
    assert "timm has no architecture 'resnet_18'" in line and "{" not in line


# --- tables and records


def _datasets(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": _id(),
            "name": f"eurosat_10shot_training_split_{i}",
            "task": "classification",
            "num_images": 1000 + i,
            "created_at": "2024-05-01T12:34:56.123456+00:00",
            "classes": ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "SeaLake"],
        }
        for i in range(n)
    ]


GALLERIES = [
    {
        "id": _id(),
        "name": "laion-subset-1m",
        "size": 1_000_000,
        "encoder": "open_clip:ViT-B-32@laion2b_s34b_b79k",
        "index_kind": "ivf_pq",
        "created_at": "2024-05-01T12:34:56",
    }
]
TRANSFER_SETS = [
    {"id": _id(), "status": "ready", "size": 5000, "dataset_id": _id(), "gallery_id": _id(), "created_at": "2024-05-01T12:34:56"}
]  # fmt: skip


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_tables_keep_every_id_whole_and_no_column_empty(
    fake_server: Any, monkeypatch: Any, columns: int
) -> None:
    datasets = _datasets(3)
    answers = {"/v1/datasets": datasets, "/v1/galleries": GALLERIES, "/v1/transfer-sets": TRANSFER_SETS}
    fake_server(lambda req: httpx.Response(200, json={"data": answers[req.url.path], "count": 1}))
    monkeypatch.setenv("COLUMNS", str(columns))
    for command, rows, always in (
        ("datasets", datasets, ["name", "num_images"]),
        ("galleries", GALLERIES, ["name"]),
        ("transfer-sets", TRANSFER_SETS, ["status"]),
    ):
        res = kt(command, "list")
        assert res.exit_code == 0, res.stderr
        lines = res.stdout.splitlines()
        assert all(len(line) <= columns for line in lines), (command, res.stdout)
        header = next(line for line in lines if line.startswith("┃"))
        cells = [c.strip() for c in header.strip("┃").split("┃")]
        assert all(cells), (command, header)  # no column folded to nothing
        assert {"id", *always} <= set(cells), (command, header)
        for row in rows:
            for key in [k for k in cells if k == "id" or k.endswith("_id")]:
                assert any(row[key] in line for line in lines), (command, key, res.stdout)  # whole
    if columns == 120:  # wide enough for every column of a dataset
        header = next(line for line in kt("datasets", "list").stdout.splitlines() if line.startswith("┃"))
        assert all(f" {c} " in header for c in ("id", "name", "task", "num_images", "created_at", "classes"))
    if columns == 80:  # the left-out columns are named
        note = next(
            line for line in kt("datasets", "list").stdout.splitlines() if "left out at this width:" in line
        )
        assert "classes" in note, note


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_tables_wrap_between_words_never_inside_a_short_one(
    fake_server: Any, monkeypatch: Any, columns: int
) -> None:
    # what `kt datasets list` showed after the tutorial's uploads: at 80 columns the name and the
    # task were cut inside a word ("eurosat-10sho" / "t", "classificati" / "on")
    datasets = [
        {**row, "name": name}
        for row, name in zip(_datasets(2), ["eurosat-test", "eurosat-10shot"], strict=True)
    ]
    fake_server(lambda req: httpx.Response(200, json={"data": datasets, "count": 2}))
    monkeypatch.setenv("COLUMNS", str(columns))
    res = kt("datasets", "list")
    assert res.exit_code == 0, res.stderr
    assert all(len(line) <= columns for line in res.stdout.splitlines()), res.stdout
    header = next(line for line in res.stdout.splitlines() if line.startswith("┃"))
    shown = [c.strip() for c in header.strip("┃").split("┃")]
    assert {"id", "name", "num_images"} <= set(shown), header
    words = {"eurosat-test", "eurosat-10shot", "1000", "1001"}
    if "task" in shown:
        words.add("classification")
    if "classes" in shown:
        words |= {"AnnualCrop,", "Forest,", "HerbaceousVegetation,", "Highway,", "Industrial,", "SeaLake"}
    for word in words:
        assert word in res.stdout, (word, res.stdout)
    if columns >= 100:
        assert "task" in shown, header


def test_show_prints_nested_values_as_key_value_lines(fake_server: Any, monkeypatch: Any) -> None:
    job = {
        "id": "j1",
        "status": "succeeded",
        "request": {
            "dataset_id": "d1",
            "recipe": {"distill": {"steps": 5000, "temperature": 2.5}},
            "export_formats": ["onnx", "safetensors"],
        },
        "metrics": {"test": {"accuracy": 0.876543}, "warnings": []},
        "stages": [{"name": "distill", "seconds": 12.5}, {"name": "export", "seconds": 1.25}],
        "error": None,
        "created_at": "2024-05-01T12:34:56.123456+00:00",
    }
    fake_server(lambda req: httpx.Response(200, json=job))
    monkeypatch.setenv("COLUMNS", "80")
    res = kt("jobs", "show", "j1")
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert '{"' not in out and "[{" not in out  # no JSON in the cells
    for text in (
        "dataset_id: d1",
        "recipe:",
        "  distill:",
        "    steps: 5000",
        "    temperature: 2.5",
        "export_formats: onnx, safetensors",
        "  accuracy: 0.8765",
        "warnings: -",
        "- name: distill",
        "  seconds: 12.5",
        "2024-05-01 12:34:56",
    ):
        assert text in out, (text, out)
    assert json.loads(kt("jobs", "show", "j1", "--json").stdout) == job  # --json: the raw JSON
    for command in (["datasets", "show", "d1"], ["models", "show", "m1"], ["transfer-sets", "show", "t1"]):
        res = kt(*command)
        assert res.exit_code == 0 and "steps: 5000" in res.stdout and '{"' not in res.stdout, command

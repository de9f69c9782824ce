"""The `kt` client commands against the real server: login files, uploads, the server's messages
and exit codes (1 refused, 2 usage, 3 unreachable, 4 job failed/canceled, 5 key refused), `--json`,
watching a job to the end and downloading its ONNX model. (test_cli_messages.py: the messages of
early mistakes, runtime failures (6), tables and `show` records.)"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from kt_client.cli import app
from kt_client.remote import cli_hint
from service.demo import free_port
from tests.client.conftest import REPO, TINY_JOB, Server

runner = CliRunner()


def kt(*args: str) -> Any:
    return runner.invoke(app, list(args))


def kt_json(*args: str) -> Any:
    res = kt(*args, "--json")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    return json.loads(res.stdout)


def raw_detail(server: Server, method: str, path: str, key: str, **kwargs: Any) -> tuple[int, str]:
    """What the server itself says, bypassing the client."""
    resp = httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {key}"}, **kwargs)
    return resp.status_code, resp.json()["detail"]


def test_login_saves_0600_credentials_and_logout_removes_them(
    server: Server, kt_env: dict[str, str], submitted_job: dict[str, Any], monkeypatch: Any
) -> None:
    # (submitted_job: the tiny job starts training now, while the other tests run)
    monkeypatch.delenv("KT_API_URL")
    monkeypatch.delenv("KT_API_KEY")
    res = kt("login", "--url", server.url + "/", "--key", server.key)
    assert res.exit_code == 0, res.stderr
    path = Path(kt_env["KT_CONFIG_DIR"]) / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": server.url, "api_key": server.key}
    # the saved login is used by the next command (no KT_API_* in the environment)
    assert any(job["id"] == submitted_job["id"] for job in kt_json("jobs", "list"))

    assert kt_json("logout") == {"removed": True, "credentials": str(path)}
    assert not path.exists()
    assert kt("logout").stdout.strip() == "Not logged in"


def test_login_with_a_bad_key_exits_5_with_the_servers_message_and_saves_nothing(
    server: Server, kt_env: dict[str, str]
) -> None:
    code, detail = raw_detail(server, "GET", "/v1/datasets", "kt_nope_nope")
    assert code == 401
    res = kt("login", "--url", server.url, "--key", "kt_nope_nope")
    assert res.exit_code == 5
    assert detail in res.stderr
    assert not (Path(kt_env["KT_CONFIG_DIR"]) / "credentials.json").exists()


def test_a_bad_key_exits_5_with_the_servers_message(
    server: Server, kt_env: dict[str, str], monkeypatch: Any
) -> None:
    monkeypatch.setenv("KT_API_KEY", "kt_abcdefgh_wrong")
    _, detail = raw_detail(server, "GET", "/v1/jobs", "kt_abcdefgh_wrong")
    res = kt("jobs", "list")
    assert res.exit_code == 5
    assert detail in res.stderr and "HTTP 401" in res.stderr and "`kt login URL --key KEY`" in res.stderr


def test_upload_a_zip_with_json_output(kt_env: dict[str, str], data: dict[str, Path]) -> None:
    dataset = kt_json("datasets", "upload", str(data["train"]), "--name", "cli-zip")
    assert dataset["name"] == "cli-zip" and dataset["num_images"] == 24
    assert dataset["class_counts"] == {"checker": 6, "circle": 6, "square": 6, "stripes": 6}
    assert kt_json("datasets", "show", dataset["id"])["id"] == dataset["id"]
    assert dataset["id"] in [row["id"] for row in kt_json("datasets", "list")]
    assert kt_json("datasets", "delete", dataset["id"]) == {"deleted": dataset["id"], "cascade": False}


def test_upload_a_directory_shows_a_progress_bar(kt_env: dict[str, str], data: dict[str, Path]) -> None:
    res = kt("datasets", "upload", str(data["train_dir"]))
    assert res.exit_code == 0, res.stderr
    assert "upload" in res.stderr and "100%" not in res.stdout  # the bar goes to stderr
    assert "24 images" in res.stdout and "(train_dir)" in res.stdout


def test_another_tenants_dataset_is_404_with_the_servers_message(
    server: Server, kt_env: dict[str, str], datasets: dict[str, dict[str, Any]]
) -> None:
    theirs = datasets["train"]["id"]  # alice's
    code, detail = raw_detail(server, "GET", f"/v1/datasets/{theirs}", server.other_key)
    assert code == 404
    kt_env_bob = kt_env | {"KT_API_KEY": server.other_key}
    res = runner.invoke(app, ["datasets", "show", theirs], env=kt_env_bob)
    assert res.exit_code == 1
    assert f"Error: {cli_hint(detail)} (HTTP 404)" in res.stderr  # the route hint as a `kt` command
    assert "`kt datasets list`" in res.stderr and "GET /v1" not in res.stderr


def test_bad_job_parameters_are_422_with_the_servers_message(
    server: Server, kt_env: dict[str, str], datasets: dict[str, dict[str, Any]]
) -> None:
    body = {**TINY_JOB, "dataset_id": datasets["train"]["id"], "image_size": 7}
    code, detail = raw_detail(server, "POST", "/v1/jobs", server.key, json=body)
    assert code == 422 and "image_size" in detail
    res = kt("jobs", "submit", datasets["train"]["id"], "--image-size", "7", "--teacher", "timm:test_vit")
    assert res.exit_code == 1
    assert detail in res.stderr


def test_usage_errors_exit_2(kt_env: dict[str, str], tmp_path: Path) -> None:
    assert kt("jobs", "submit", "ds", "--steps", "1,2").exit_code == 2
    assert kt("jobs", "submit").exit_code == 2
    assert kt("datasets", "upload", str(tmp_path / "missing.zip")).exit_code == 2
    assert kt("jobs", "show").exit_code == 2  # click: a missing argument
    (tmp_path / "bad.json").write_text("{not json")
    res = kt("jobs", "submit", "ds", "--body", str(tmp_path / "bad.json"))
    assert res.exit_code == 2 and "cannot read --body" in res.stderr


def test_an_unreachable_server_exits_3(kt_env: dict[str, str], monkeypatch: Any) -> None:
    monkeypatch.setenv("KT_API_URL", f"http://127.0.0.1:{free_port()}")
    res = kt("jobs", "list")
    assert res.exit_code == 3
    assert "Cannot reach the vfm-kt server" in res.stderr
    # the console script itself, as a script sees it
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("kt")), "datasets", "list", "--json"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""


def test_jobs_watch_follows_the_job_until_it_succeeds(
    kt_env: dict[str, str], submitted_job: dict[str, Any]
) -> None:
    res = kt("jobs", "watch", submitted_job["id"], "--poll", "0.5")
    assert res.exit_code == 0, res.stderr
    assert f"Job {submitted_job['id']} succeeded; model " in res.stdout
    assert "succeeded" in res.stderr  # the live stage column
    job = kt_json("jobs", "show", submitted_job["id"])
    assert job["status"] == "succeeded" and job["model_id"]
    assert kt("jobs", "logs", submitted_job["id"]).exit_code == 0


def test_retrying_a_succeeded_job_is_refused_with_exit_1(
    server: Server, kt_env: dict[str, str], finished_job: dict[str, Any]
) -> None:
    code, detail = raw_detail(server, "POST", f"/v1/jobs/{finished_job['id']}/retry", server.key)
    assert code == 409
    res = kt("jobs", "retry", finished_job["id"])
    assert res.exit_code == 1 and detail in res.stderr


def test_a_canceled_job_makes_watch_exit_4(
    kt_env: dict[str, str], datasets: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    body = tmp_path / "job.json"
    body.write_text(json.dumps({**TINY_JOB, "dataset_id": "overridden", "export_formats": ["onnx"]}))
    # a --body file, its fields overridden by the options; many distill steps, so that a worker that
    # picked the job up before the cancel still sees it at its next progress report
    job = kt_json("jobs", "submit", datasets["train"]["id"], "--body", str(body), "--steps", "1,500,1",
                  "--export", "safetensors")  # fmt: skip
    assert job["status"] == "queued" and job["request"]["dataset_id"] == datasets["train"]["id"]
    assert job["request"]["steps"] == {"finetune_teacher": 1, "distill": 500, "finetune_student": 1}
    assert (
        job["request"]["export_formats"] == ["safetensors"] and job["request"]["teacher"] == "timm:test_vit"
    )
    assert kt_json("jobs", "cancel", job["id"])["cancel_requested"] is True
    res = kt("jobs", "watch", job["id"], "--poll", "0.5", "--json")
    assert res.exit_code == 4
    assert json.loads(res.stdout)["status"] == "canceled"
    assert f"Job {job['id']} canceled" in res.stderr


def test_models_download_onnx_gives_a_loadable_model(
    kt_env: dict[str, str], finished_job: dict[str, Any], tmp_path: Path
) -> None:
    import numpy as np
    import onnxruntime as ort

    model_id = finished_job["model_id"]
    card = kt_json("models", "show", model_id)
    assert "onnx" in card["formats"]
    out = kt_json("models", "download", model_id, "--format", "onnx", "-o", str(tmp_path / "student.onnx"))
    assert out["path"] == str(tmp_path / "student.onnx") and out["bytes"] > 0
    session = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    (logits,) = session.run(None, {inp.name: np.random.rand(1, 3, 32, 32).astype(np.float32)})
    assert logits.shape == (1, 4)
    # into a folder, with the default name
    res = kt("models", "download", model_id, "--format", "safetensors", "-o", str(tmp_path))
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / f"model-{model_id}.safetensors").stat().st_size > 0
    # a format that was not exported: the server's 404 message
    res = kt("models", "download", model_id, "--format", "torchscript", "-o", str(tmp_path))
    assert res.exit_code == 1 and "was not exported as torchscript" in res.stderr


def test_kt_predict_on_the_downloaded_onnx_reproduces_the_cards_test_metric(
    kt_env: dict[str, str], finished_job: dict[str, Any], data: dict[str, Path], tmp_path: Path
) -> None:
    model_id = finished_job["model_id"]
    out = kt_json("models", "download", model_id, "--format", "onnx", "-o", str(tmp_path))
    model = Path(out["path"])
    card = json.loads(model.with_name(model.stem + ".model_card.json").read_text())  # written beside it
    assert card == kt_json("models", "show", model_id)["card"]
    rows = kt_json("predict", str(model), str(data["test"]))
    test = card["metrics"]["test"]
    assert len(rows) == test["n"] == 12
    correct = sum(r["path"].split(":")[-1].split("/")[0] == r["label"] for r in rows)
    assert abs(correct - test["top1"] * test["n"] / 100) <= 1


def test_kt_help_documents_exit_codes_and_does_not_import_httpx() -> None:
    res = kt("--help")
    assert "Exit codes: 0 ok; 1" in res.stdout
    for group in ("login", "datasets", "transfer-sets", "jobs", "models"):
        assert f"  {group} " in res.stdout
    code = "import sys, kt_client.cli; assert 'httpx' not in sys.modules, 'httpx imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_jobs_submit_help_lists_the_recipe_options() -> None:
    from service.schemas import RecipeOverrides

    res = kt("jobs", "submit", "--help")
    assert res.exit_code == 0
    for option in (
        "--budget",
        "--seed",
        "--teacher-image-size",
        "--student-image-size",
        "--transfer-set ",
        "--distill-steps",
        "--temperature",
        "--no-student-finetune",
        "--set",
    ):
        assert option in res.stdout, option
    text = " ".join(res.stdout.split())  # rich wraps the help
    for section, field in RecipeOverrides.model_fields.items():
        assert f"recipe.{section}." in text, section
        for knob in field.annotation.model_fields:  # type: ignore[union-attr]
            assert knob in text, f"recipe.{section}.{knob}"
    assert "  list " in kt("transfer-sets", "--help").stdout  # the ids --transfer-set takes
    # --steps A,B,C: A is the linear probe only (a walk-through's --steps 20,100,20 still ran the
    # budget's 150 full-finetune steps of the teacher); the help says so and how to change those
    assert "teacher's linear probe" in text and "recipe.teacher.full_finetune_steps=N" in text


def test_jobs_submit_options_build_the_request(monkeypatch: Any, tmp_path: Path) -> None:
    """The options land in the request body as the API names them (a stand-in client records it)."""
    import kt_client.client

    sent: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self) -> None:
            self.jobs = self

        def __enter__(self) -> Recorder:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def submit(self, body: dict[str, Any]) -> dict[str, Any]:
            sent.append(body)
            return {"id": "j1", "queue": "cpu", "request": body}

    monkeypatch.setattr(kt_client.client, "Client", Recorder)
    monkeypatch.setenv("KT_API_KEY", "kt_abcdefgh_secret")  # logged in (no request leaves the stand-in)
    (tmp_path / "body.json").write_text(json.dumps({"recipe": {"teacher": {"layer_decay": 0.7}}}))
    res = kt(
        "jobs", "submit", "ds1", "--body", str(tmp_path / "body.json"),
        "--budget", "best", "--seed", "7", "--teacher-image-size", "224", "--student-image-size", "128",
        "--transfer-set", "ts1", "--distill-steps", "5000", "--temperature", "2.5", "--no-student-finetune",
        "--set", "recipe.distill.cache_mode=cached", "--set", "recipe.curate.teacher_filter=false",
        "--set", "recipe.distill.ce_weight=0.5",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert sent == [
        {
            "dataset_id": "ds1",
            "budget": "best",
            "seed": 7,
            "teacher_image_size": 224,
            "student_image_size": 128,
            "transfer_set_id": "ts1",
            "recipe": {
                "teacher": {"layer_decay": 0.7},
                "distill": {"steps": 5000, "temperature": 2.5, "cache_mode": "cached", "ce_weight": 0.5},
                "finetune_student": {"enabled": False},
                "curate": {"teacher_filter": False},
            },
        }
    ]
    for bad in ("recipe.distill.steps", "recipe..steps=1", "dataset_id.x=1"):
        res = kt("jobs", "submit", "ds1", "--set", bad)
        assert res.exit_code == 2 and "--set" in res.stderr, (bad, res.stderr)

"""The ``kt`` commands that talk to a running service over HTTP (through ``kt_client.Client``).

    kt login http://127.0.0.1:8000 --key kt_...
    kt datasets upload data/train            # a folder of class folders, or a .zip
    kt jobs submit DATASET_ID --teacher timm:vit_small_patch14_dinov2.lvd142m --student timm:resnet18
    kt jobs watch JOB_ID
    kt models download MODEL_ID --format onnx -o model.onnx

Every command takes ``--json`` (machine-readable output on stdout; progress goes to stderr).
httpx and the client are imported inside the commands, so ``kt --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from kt_client.client import Client
    from kt_client.config import Credentials

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_JOB_FAILED = 4
EXIT_AUTH = 5
EXIT_RUNTIME = 6

EXIT_CODES_HELP = (
    "\b\nExit codes: 0 ok; 1 the server refused the request (4xx: a bad parameter, an unknown id, a "
    "conflict; its message on stderr); 2 usage error (options, arguments, local files); 3 cannot reach "
    "the server (the URL tried is named); 4 the job failed or was canceled (`kt jobs watch`, --watch); "
    "5 not logged in, or the server refused the API key (401); 6 the server failed (5xx), a download "
    "broke off, or a file could not be written."
)

NOT_LOGGED_IN = (
    "not logged in: run `kt login URL --key KEY` (a key from `kt admin create-key --tenant NAME`), "
    "or set KT_API_URL and KT_API_KEY"
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON on stdout (for scripts).")]


def _stderr(message: str) -> None:
    typer.echo(message, err=True)


# The API's messages name HTTP routes ("`GET /v1/datasets` lists your datasets"); on the command line
# the `kt` command that does the same is the useful hint. (method, route pattern, command template)
_ID = r"([A-Za-z0-9_\-]+|\{\w+\})"
_ROUTE_COMMANDS: list[tuple[str, str, str]] = [
    ("GET", r"/v1/datasets", "kt datasets list"),
    ("POST", r"/v1/datasets", "kt datasets upload PATH"),
    ("GET", rf"/v1/datasets/{_ID}", "kt datasets show {0}"),
    ("DELETE", rf"/v1/datasets/{_ID}", "kt datasets delete {0}"),
    ("DELETE", rf"/v1/datasets/{_ID}\?cascade=true", "kt datasets delete {0} --cascade"),
    ("GET", r"/v1/transfer-sets", "kt transfer-sets list"),
    ("POST", r"/v1/transfer-sets", "kt transfer-sets create DATASET_ID --gallery GALLERY_ID"),
    ("GET", rf"/v1/transfer-sets/{_ID}", "kt transfer-sets show {0}"),
    ("GET", rf"/v1/transfer-sets/{_ID}/manifest", "kt transfer-sets download {0}"),
    ("GET", rf"/v1/transfer-sets/{_ID}/report", "kt transfer-sets download {0} --format html"),
    ("GET", r"/v1/jobs", "kt jobs list"),
    ("POST", r"/v1/jobs", "kt jobs submit DATASET_ID"),
    ("GET", rf"/v1/jobs/{_ID}", "kt jobs show {0}"),
    ("GET", rf"/v1/jobs/{_ID}/logs", "kt jobs logs {0}"),
    ("POST", rf"/v1/jobs/{_ID}/cancel", "kt jobs cancel {0}"),
    ("POST", rf"/v1/jobs/{_ID}/retry", "kt jobs retry {0}"),
    ("GET", r"/v1/models", "kt models list"),
    ("GET", rf"/v1/models/{_ID}", "kt models show {0}"),
    ("GET", rf"/v1/models/{_ID}/download", "kt models download {0}"),
    ("GET", r"/v1/galleries", "kt galleries list"),
    ("GET", r"/v1/registered-models", "kt registered-models list"),
]
_ROUTE_IN_TEXT = re.compile(
    r"(`?)\b(GET|POST|DELETE|PUT|PATCH) (/v1/[A-Za-z0-9_\-/{}]*[A-Za-z0-9_\-}](?:\?[A-Za-z0-9_=&]+)?)\1"
)


def _command_for(method: str, path: str) -> str | None:
    for route_method, pattern, template in _ROUTE_COMMANDS:
        match = re.fullmatch(pattern, path)
        if route_method == method and match:
            args = [a if not a.startswith("{") else a.strip("{}").upper() for a in match.groups()]
            return template.format(*args)
    return None


def cli_hint(detail: str) -> str:
    """The server's message with its HTTP routes written as the `kt` commands that do the same
    (a route with no command is left as it is)."""

    def replace(match: re.Match[str]) -> str:
        command = _command_for(match[2], match[3])
        return f"`{command}`" if command else match[0]

    text = _ROUTE_IN_TEXT.sub(replace, detail)
    return re.sub(r"(`kt [^`]+`) \(\1\)", r"\1", text)  # "`kt x` (GET /v1/x)": said twice now


def _credentials() -> Credentials:
    """The URL and key the next command uses; exits 5 when there is no key anywhere."""
    from kt_client import config

    try:
        creds = config.resolve()
    except ValueError as err:  # an unreadable saved login
        _stderr(f"Error: {err}")
        raise typer.Exit(EXIT_AUTH) from err
    if not creds.api_key:
        _stderr(f"Error: {NOT_LOGGED_IN}")
        raise typer.Exit(EXIT_AUTH)
    return creds


@contextlib.contextmanager
def _client() -> Iterator[Client]:
    """A ``Client`` from KT_API_URL/KT_API_KEY or the saved login; errors become exit codes."""
    from kt_client.client import Client
    from kt_client.errors import (
        APIError,
        AuthenticationError,
        DownloadFailed,
        ServerError,
        ServerUnreachable,
    )

    creds = _credentials()
    try:
        with Client() as client:
            yield client
    except AuthenticationError as err:
        _stderr(
            f"Error: {cli_hint(err.detail)} (HTTP {err.status_code}, key from "
            f"{'KT_API_KEY' if os.environ.get('KT_API_KEY') else 'the saved login'}); "
            "log in again with `kt login URL --key KEY`"
        )
        raise typer.Exit(EXIT_AUTH) from err
    except ServerError as err:
        _stderr(f"Error: the server failed: {cli_hint(err.detail)} (HTTP {err.status_code})")
        raise typer.Exit(EXIT_RUNTIME) from err
    except APIError as err:
        _stderr(f"Error: {cli_hint(err.detail)} (HTTP {err.status_code})")
        raise typer.Exit(EXIT_API_ERROR) from err
    except DownloadFailed as err:
        _stderr(f"Error: {err}")
        raise typer.Exit(EXIT_RUNTIME) from err
    except ServerUnreachable as err:
        _stderr(f"Error: {err} (the URL is from {creds.url_from})")
        raise typer.Exit(EXIT_UNREACHABLE) from err
    except json.JSONDecodeError as err:  # a 2xx that is not the API's JSON: a proxy, another server
        _stderr(f"Error: the answer from {creds.url} is not the vfm-kt API's JSON ({err}); is the URL right?")
        raise typer.Exit(EXIT_RUNTIME) from err
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        _stderr(f"Error: {err}")
        raise typer.Exit(EXIT_USAGE) from err
    except OSError as err:  # a file that could not be written or read: permissions, a full disk
        _stderr(f"Error: {err}")
        raise typer.Exit(EXIT_RUNTIME) from err


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def _table(rows: list[dict[str, Any]], columns: list[str], title: str, drop: tuple[str, ...] = ()) -> None:
    from kt_client import render

    render.table(_console(), rows, columns, title, drop)


def _show(obj: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        _print_json(obj)
        return
    from kt_client import render

    render.record(_console(), obj, title)


# --- login


def login(
    url_arg: Annotated[
        str | None,
        typer.Argument(
            metavar="URL", help="The service's base URL, e.g. http://127.0.0.1:8000.", show_default=False
        ),
    ] = None,
    key: Annotated[str, typer.Option("--key", help="An API key (`kt admin create-key --tenant NAME`).")] = "",
    url_opt: Annotated[str | None, typer.Option("--url", help="The URL, as an option.")] = None,
    verify: Annotated[bool, typer.Option(help="Check the key against the server before saving it.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Save the service URL and API key (`kt login URL --key KEY`; to ~/.config/vfm-kt/credentials.json,
    mode 0600; KT_CONFIG_DIR moves it). KT_API_URL / KT_API_KEY override the saved login."""
    from kt_client import config

    if url_arg and url_opt and url_arg.rstrip("/") != url_opt.rstrip("/"):
        _stderr(f"Error: two URLs ({url_arg} and --url {url_opt}); give one")
        raise typer.Exit(EXIT_USAGE)
    if not (url_arg or url_opt) or not key:
        _stderr("Error: give the server's URL and an API key: `kt login URL --key KEY`")
        raise typer.Exit(EXIT_USAGE)
    url = str(url_arg or url_opt).rstrip("/")
    if not url.lower().startswith(("http://", "https://")):  # httpx: "missing an 'http://'" as unreachable
        _stderr(f"Error: the URL needs its scheme: `kt login http://{url} --key KEY` (or https://)")
        raise typer.Exit(EXIT_USAGE)
    if verify:
        from kt_client.client import Client
        from kt_client.errors import APIError, AuthenticationError, ServerError, ServerUnreachable

        try:
            with Client(url, key, max_retries=1) as client:
                client.datasets.list(limit=1)
        except APIError as err:
            _stderr(f"Error: {cli_hint(err.detail)} (HTTP {err.status_code}); nothing saved")
            code = {AuthenticationError: EXIT_AUTH, ServerError: EXIT_RUNTIME}.get(type(err), EXIT_API_ERROR)
            raise typer.Exit(code) from err
        except ServerUnreachable as err:
            _stderr(f"Error: {err}; nothing saved")
            raise typer.Exit(EXIT_UNREACHABLE) from err
    path = config.save(url, key)
    if as_json:
        _print_json({"url": url, "credentials": str(path)})
    else:
        typer.echo(f"Logged in to {url}; saved to {path}")


def logout(as_json: JsonOpt = False) -> None:
    """Forget the saved login."""
    from kt_client import config

    removed = config.forget()
    if as_json:
        _print_json({"removed": removed, "credentials": str(config.credentials_path())})
    else:
        typer.echo(f"Removed {config.credentials_path()}" if removed else "Not logged in")


# --- datasets

datasets_app = typer.Typer(
    help="Labeled datasets on the server: upload, list, show, delete.", no_args_is_help=True
)


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(help="A folder of class folders of images, or a .zip of one.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file name).")] = None,
    task: Annotated[
        str | None,
        typer.Option(help="classification (default) or segmentation (images/ + masks/ + classes.json)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a labeled dataset (a folder is zipped on the fly), with a progress bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    if not path.exists():
        _stderr(f"Error: {path} does not exist; pass a folder of class folders or a .zip")
        raise typer.Exit(EXIT_USAGE)
    with (
        _client() as client,
        Progress(
            "[bold]upload",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=_console(stderr=True),
            transient=as_json,
        ) as bar,
    ):
        shown = bar.add_task("upload", total=None)

        def progress(sent: int, total: int) -> None:
            bar.update(shown, completed=sent, total=total)

        dataset = client.datasets.upload(path, name=name, progress=progress, task=task)
    if as_json:
        _print_json(dataset)
    else:
        counts = ", ".join(f"{k}: {v}" for k, v in dataset["class_counts"].items())
        what = "image + mask pairs" if dataset.get("task") == "segmentation" else "images"
        typer.echo(f"Dataset {dataset['id']} ({dataset['name']}): {dataset['num_images']} {what}; {counts}")


@datasets_app.command("list")
def datasets_list(as_json: JsonOpt = False) -> None:
    """Your datasets, newest first."""
    with _client() as client:
        rows = client.datasets.list()
    if as_json:
        _print_json(rows)
    else:
        _table(
            rows,
            ["id", "name", "task", "num_images", "created_at", "classes"],
            "datasets",
            drop=("classes", "created_at", "task"),
        )


@datasets_app.command("show")
def datasets_show(dataset_id: str, as_json: JsonOpt = False) -> None:
    """One dataset: classes and per-class counts."""
    with _client() as client:
        _show(client.datasets.get(dataset_id), as_json, f"dataset {dataset_id}")


@datasets_app.command("delete")
def datasets_delete(
    dataset_id: str,
    cascade: Annotated[
        bool,
        typer.Option(
            "--cascade",
            help="Also delete what shows its images: transfer sets curated for it, jobs' curated sets, "
            "galleries built from it (models trained on it are kept). Without it, the server refuses "
            "while any exist and lists them.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a dataset and its files (with --cascade, what was made from its images too)."""
    with _client() as client:
        client.datasets.delete(dataset_id, cascade=cascade)
    if as_json:
        _print_json({"deleted": dataset_id, "cascade": cascade})
    else:
        typer.echo(
            f"Deleted dataset {dataset_id}" + (" and what was made from its images" if cascade else "")
        )


# --- transfer sets

transfer_sets_app = typer.Typer(
    help="Transfer sets curated on the server from a gallery: create, list, show, download.",
    no_args_is_help=True,
)


@transfer_sets_app.command("create")
def transfer_sets_create(
    dataset_id: str,
    gallery_id: Annotated[str, typer.Option("--gallery", help="Gallery id (`kt galleries list`).")],
    size: Annotated[int, typer.Option(help="Items in the transfer set.")] = 5000,
    method: Annotated[str, typer.Option(help="Curation method, e.g. query_balanced.")] = "query_balanced",
    watch: Annotated[bool, typer.Option("--watch", help="Follow the curation job until it ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Curate a transfer set for a dataset from a gallery (a job on the server)."""
    with _client() as client:
        ts = client.transfer_sets.create(dataset_id, gallery_id, size=size, method=method)
        if watch and ts.get("job_id"):
            job = _watch(client, ts["job_id"], poll_s=1.0, timeout=None, quiet=as_json)
            ts = client.transfer_sets.get(ts["id"])
            if job["status"] != "succeeded":
                _stderr(f"Error: curation job {job['id']} {job['status']}: {job.get('error')}")
                raise typer.Exit(EXIT_JOB_FAILED)
    if as_json:
        _print_json(ts)
    else:
        typer.echo(f"Transfer set {ts['id']} ({ts['status']}); job {ts.get('job_id')}")


@transfer_sets_app.command("list")
def transfer_sets_list(as_json: JsonOpt = False) -> None:
    """Your transfer sets, newest first (a ready one's id is `kt jobs submit --transfer-set`)."""
    with _client() as client:
        rows = client.transfer_sets.list()
    if as_json:
        _print_json(rows)
    else:
        _table(
            rows,
            ["id", "status", "size", "dataset_id", "gallery_id", "created_at"],
            "transfer sets",
            drop=("gallery_id", "created_at", "dataset_id", "size"),
        )


@transfer_sets_app.command("show")
def transfer_sets_show(transfer_set_id: str, as_json: JsonOpt = False) -> None:
    """A transfer set: status, parameters, summary (per-class counts, scores)."""
    with _client() as client:
        _show(client.transfer_sets.get(transfer_set_id), as_json, f"transfer set {transfer_set_id}")


@transfer_sets_app.command("download")
def transfer_sets_download(
    transfer_set_id: str,
    format: Annotated[
        str, typer.Option(help="jsonl, csv or parquet (the manifest), or html (the report).")
    ] = "jsonl",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File or folder to write.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a ready transfer set's manifest or HTML report."""
    with _client() as client:
        if format == "html":
            path = client.transfer_sets.report(transfer_set_id, output)
        else:
            path = client.transfer_sets.manifest(transfer_set_id, format, output)
    _saved(path, as_json)


def _saved(path: Path, as_json: bool) -> None:
    if as_json:
        _print_json({"path": str(path.resolve()), "bytes": path.stat().st_size})
    else:
        typer.echo(f"Saved {path} ({path.stat().st_size} bytes)")


# --- jobs

jobs_app = typer.Typer(
    help="Training jobs: submit, list, show, watch, events, cancel, retry, logs.", no_args_is_help=True
)


def _recipe_keys() -> str:
    """The ``recipe.*`` keys of a job request, for ``--set``'s help (from the request schema itself)."""
    from service.schemas import RecipeOverrides

    sections = []
    for name, field in RecipeOverrides.model_fields.items():
        sub = field.annotation
        assert isinstance(sub, type)
        sections.append(f"recipe.{name}.{{{', '.join(sub.model_fields)}}}")  # type: ignore[attr-defined]
    return "; ".join(sections)


SET_HELP = (
    "Set any request field by its dotted path (applied after the other options; repeatable). "
    'VALUE is JSON (5000, 0.5, true, "cached") or else a string. The recipe\'s knobs '
    f"(unset: the --budget's): {_recipe_keys()}. E.g. --set recipe.distill.steps=5000."
)


def _set_path(request: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` to the request."""
    key, sep, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        _stderr(f"Error: --set {assignment!r} must look like recipe.distill.steps=5000")
        raise typer.Exit(EXIT_USAGE)
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    node = request
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            _stderr(f"Error: --set {key}: {part!r} is not an object in the request")
            raise typer.Exit(EXIT_USAGE)
    node[parts[-1]] = value


@jobs_app.command("submit")
def jobs_submit(
    dataset_id: Annotated[str | None, typer.Argument(help="The labeled dataset to train on.")] = None,
    body: Annotated[
        Path | None,
        typer.Option("--body", help="A JSON file with the whole request (options below override it)."),
    ] = None,
    test_dataset: Annotated[
        str | None, typer.Option("--test-dataset", help="Dataset id to evaluate on.")
    ] = None,
    gallery: Annotated[
        str | None, typer.Option("--gallery", help="Gallery id to curate a transfer set from.")
    ] = None,
    transfer_set_size: Annotated[int | None, typer.Option(help="Transfer set size (with --gallery).")] = None,
    transfer_set: Annotated[
        str | None,
        typer.Option(
            "--transfer-set",
            help="Distill on this ready transfer set (`kt transfer-sets list`) instead of curating one.",
        ),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher: timm:<name>[@tag] or open_clip:<arch>[@tag].")
    ] = None,
    student: Annotated[str | None, typer.Option(help="Student: timm:<name>.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side of both models.")] = None,
    teacher_image_size: Annotated[int | None, typer.Option(help="Input side of the teacher.")] = None,
    student_image_size: Annotated[int | None, typer.Option(help="Input side of the student.")] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="The recipe: fast, balanced (the server's default) or best; they differ in "
            "distillation steps and cached views per image."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice (default 0).")] = None,
    distill_steps: Annotated[
        int | None, typer.Option(help="Distillation steps (recipe.distill.steps; default: the budget's).")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="Distillation temperature (recipe.distill.temperature; default: the budget's)."),
    ] = None,
    no_student_finetune: Annotated[
        bool,
        typer.Option(
            "--no-student-finetune",
            help="Skip the student finetune stage: the exported model is the distilled student.",
        ),
    ] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help=SET_HELP)] = None,
    steps: Annotated[
        str | None,
        typer.Option(
            help="Steps of the teacher's linear probe, the distillation and the student finetune, e.g. "
            "100,300,100 (the teacher's full finetune keeps the budget's: --set "
            "recipe.teacher.full_finetune_steps=N; older form, prefer --distill-steps / --set recipe.*)."
        ),
    ] = None,
    export: Annotated[str | None, typer.Option(help="Export formats, e.g. safetensors,onnx.")] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, or auto (the server's default queue).")
    ] = None,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            "--webhook-url",
            help="POST a signed JSON notification here when the job ends (https; the secret that signs "
            "it, X-KT-Signature: sha256=HMAC-SHA256 of the body, is printed once).",
        ),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the job until it ends (like `kt jobs watch`).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Queue a training job: finetune the teacher, (curate,) distill, finetune the student, export."""
    request: dict[str, Any] = {}
    if body is not None:
        try:
            request = json.loads(body.read_text())
        except (OSError, ValueError) as err:
            _stderr(f"Error: cannot read --body {body}: {err}")
            raise typer.Exit(EXIT_USAGE) from err
        if not isinstance(request, dict):
            _stderr(f"Error: --body {body} must hold a JSON object")
            raise typer.Exit(EXIT_USAGE)
    options: dict[str, Any] = {
        "dataset_id": dataset_id,
        "test_dataset_id": test_dataset,
        "gallery_id": gallery,
        "transfer_set_size": transfer_set_size,
        "teacher": teacher,
        "student": student,
        "image_size": image_size,
        "teacher_image_size": teacher_image_size,
        "student_image_size": student_image_size,
        "transfer_set_id": transfer_set,
        "budget": budget,
        "seed": seed,
        "device": device,
        "webhook_url": webhook_url,
    }
    request.update({k: v for k, v in options.items() if v is not None})
    knobs = {
        "recipe.distill.steps": distill_steps,
        "recipe.distill.temperature": temperature,
        "recipe.finetune_student.enabled": False if no_student_finetune else None,
    }
    for key, value in knobs.items():
        if value is not None:
            _set_path(request, f"{key}={json.dumps(value)}")
    if steps is not None:
        parts = steps.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            _stderr(
                "Error: --steps takes three comma-separated numbers: finetune_teacher,distill,finetune_student"
            )
            raise typer.Exit(EXIT_USAGE)
        request["steps"] = dict(
            zip(("finetune_teacher", "distill", "finetune_student"), map(int, parts), strict=True)
        )
    if export is not None:
        request["export_formats"] = [f.strip() for f in export.split(",") if f.strip()]
    for assignment in set_ or []:
        _set_path(request, assignment)
    if "dataset_id" not in request:
        _stderr("Error: give a DATASET_ID (or a --body file with dataset_id)")
        raise typer.Exit(EXIT_USAGE)
    with _client() as client:
        job = client.jobs.submit(request)
        if not as_json:
            typer.echo(f"Job {job['id']} queued ({job['queue']} queue)")
            if job.get("webhook_secret"):
                typer.echo(f"Webhook secret (shown once; it signs the notification): {job['webhook_secret']}")
        if watch:
            job = _watch(client, job["id"], poll_s=1.0, timeout=None, quiet=as_json)
    if as_json:
        _print_json(job)
    if watch:
        _finish(job, as_json)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[
        str | None, typer.Option(help="Only jobs with this status (queued, running, ...).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Your jobs, newest first."""
    with _client() as client:
        rows = client.jobs.list(status=status)
    if as_json:
        _print_json(rows)
    else:
        _table(
            rows, ["id", "status", "stage", "progress", "created_at"], "jobs", drop=("created_at", "progress")
        )


@jobs_app.command("show")
def jobs_show(job_id: str, as_json: JsonOpt = False) -> None:
    """A job: status, stage, progress, timings, metrics, error."""
    with _client() as client:
        _show(client.jobs.get(job_id), as_json, f"job {job_id}")


def job_line(job: dict[str, Any]) -> str:
    """``job 3f2a…: running distill, 45%, ETA 12m03s`` (``kt jobs watch`` off a terminal)."""
    from kt_train.progress import format_duration

    done = 1.0 if job["status"] == "succeeded" else float(job.get("progress") or 0.0)
    line = f"job {job['id']}: {job['status']} {job.get('stage') or '-'}, {100 * done:.0f}%"
    eta = job.get("eta_s")
    if isinstance(eta, int | float) and job["status"] == "running":
        line += f", ETA {format_duration(eta)}"
    return line


def _watch_lines(
    client: Client, job_id: str, *, poll_s: float, timeout: float | None, interval_s: float | None
) -> dict[str, Any]:
    """``_watch`` where stderr is not a terminal (logs, CI, nohup): a ``job_line`` when the status
    or stage changes and every ``interval_s`` seconds (``KT_PROGRESS_INTERVAL``, else 30)."""
    import time

    from kt_train.progress import progress_interval

    every = progress_interval(interval_s)
    state: dict[str, Any] = {"key": None, "at": float("-inf")}

    def update(job: dict[str, Any]) -> None:
        now = time.monotonic()
        key = (job["status"], job.get("stage"))
        if key != state["key"] or now - state["at"] >= every:
            state["key"], state["at"] = key, now
            _stderr(job_line(job))

    return client.jobs.wait(job_id, poll_s=poll_s, timeout=timeout, callback=update)


def _watch(
    client: Client,
    job_id: str,
    *,
    poll_s: float,
    timeout: float | None,
    quiet: bool,
    interval_s: float | None = None,
) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not _console(stderr=True).is_terminal:
        return _watch_lines(client, job_id, poll_s=poll_s, timeout=timeout, interval_s=interval_s)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[stage]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=_console(stderr=True),
        transient=quiet,
    ) as bar:
        task = bar.add_task(f"job {job_id}", total=1.0, stage="", eta="?")

        def update(job: dict[str, Any]) -> None:
            eta = job.get("eta_s")
            done = 1.0 if job["status"] == "succeeded" else float(job.get("progress") or 0.0)
            bar.update(
                task,
                completed=done,
                stage=f"{job['status']}: {job.get('stage') or '-'}",
                eta=f"{eta:.0f}s" if isinstance(eta, int | float) else "?",
            )

        return client.jobs.wait(job_id, poll_s=poll_s, timeout=timeout, callback=update)


def _finish(job: dict[str, Any], as_json: bool) -> None:
    if job["status"] == "succeeded":
        if not as_json:
            typer.echo(f"Job {job['id']} succeeded; model {job.get('model_id')}")
        return
    _stderr(f"Job {job['id']} {job['status']}: {job.get('error') or '(no error message)'}")
    raise typer.Exit(EXIT_JOB_FAILED)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str,
    poll: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 1).")] = None,
    progress_interval: Annotated[
        float | None,
        typer.Option(
            "--progress-interval",
            min=0.0,
            help="Off a terminal (logs, CI, nohup): seconds between progress lines "
            "(default: KT_PROGRESS_INTERVAL, else 30); a line also when the status or stage changes.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a job (stage and progress bar) until it ends: exit 0 succeeded, 4 failed or canceled.

    Off a terminal the bar is a line on stderr, `job ID: running distill, 45%, ETA 12m03s`, when the
    status or stage changes and every --progress-interval seconds."""
    with _client() as client:
        try:
            job = _watch(
                client, job_id, poll_s=poll, timeout=timeout, quiet=as_json, interval_s=progress_interval
            )
        except TimeoutError as err:
            _stderr(f"Error: {err}")
            raise typer.Exit(EXIT_API_ERROR) from err
    if as_json:
        _print_json(job)
    _finish(job, as_json)


@jobs_app.command("events")
def jobs_events(
    job_id: str,
    poll: Annotated[float, typer.Option(min=0.1, max=60.0, help="Seconds between the server's looks.")] = 1.0,
) -> None:
    """Print the job as one JSON line each time it changes (the server's event stream,
    `GET /v1/jobs/{id}/events`) until it ends: exit 0 succeeded, 4 failed or canceled. For scripts:
    `kt jobs events ID | jq -r .progress`."""
    job: dict[str, Any] | None = None
    with _client() as client:
        for job in client.jobs.events(job_id, poll_s=poll):
            typer.echo(json.dumps(job, separators=(",", ":")))
    if job is None:
        _stderr(f"Error: the event stream of job {job_id} ended without the job")
        raise typer.Exit(EXIT_RUNTIME)
    _finish(job, as_json=True)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running job."""
    with _client() as client:
        job = client.jobs.cancel(job_id)
    _print_json(job) if as_json else typer.echo(f"Job {job_id}: {job['status']} (cancel requested)")


@jobs_app.command("retry")
def jobs_retry(job_id: str, as_json: JsonOpt = False) -> None:
    """Run a failed or canceled job again (it resumes where it stopped)."""
    with _client() as client:
        job = client.jobs.retry(job_id)
    _print_json(job) if as_json else typer.echo(f"Job {job_id}: {job['status']}")


@jobs_app.command("logs")
def jobs_logs(job_id: str, as_json: JsonOpt = False) -> None:
    """The job's log (its last megabyte)."""
    with _client() as client:
        text = client.jobs.logs(job_id)
    if as_json:
        _print_json({"job_id": job_id, "log": text})
    else:
        sys.stdout.write(text)


# --- models and galleries

models_app = typer.Typer(help="Trained models: list, show the card, download.", no_args_is_help=True)


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Your models, newest first."""
    with _client() as client:
        rows = client.models.list()
    if as_json:
        _print_json(rows)
    else:
        _table(rows, ["id", "formats", "created_at"], "models", drop=("created_at",))


@models_app.command("show")
def models_show(model_id: str, as_json: JsonOpt = False) -> None:
    """The model card (classes, preprocessing, metrics, lineage) and downloadable formats."""
    with _client() as client:
        _show(client.models.get(model_id), as_json, f"model {model_id}")


@models_app.command("download")
def models_download(
    model_id: str,
    format: Annotated[str, typer.Option(help="safetensors, onnx or torchscript.")] = "safetensors",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File or folder to write.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download one exported format of a model, and its card beside it (<name>.model_card.json),
    so that `kt predict FILE IMAGES...` runs it with the card's preprocessing."""
    from kt_train.formats import EXPORT_FORMATS, not_exported_message

    if format not in EXPORT_FORMATS:  # the server's 422 would name its query parameter, not the way
        why = not_exported_message(format) or f"unknown format {format!r}"
        _stderr(f"Error: {why}; `kt models download {model_id} --format {'|'.join(EXPORT_FORMATS)}`")
        raise typer.Exit(EXIT_USAGE)
    with _client() as client:
        path = client.models.download(model_id, format, output, card=True)
    _saved(path, as_json)


galleries_app = typer.Typer(help="Galleries (unlabeled image indexes) on the server.", no_args_is_help=True)


@galleries_app.command("list")
def galleries_list(as_json: JsonOpt = False) -> None:
    """The galleries transfer sets can be curated from."""
    with _client() as client:
        rows = client.galleries.list()
    if as_json:
        _print_json(rows)
    else:
        _table(
            rows,
            ["id", "name", "size", "encoder", "index_kind", "created_at"],
            "galleries",
            drop=("index_kind", "created_at", "size", "encoder"),
        )


registered_models_app = typer.Typer(
    help="Teacher weights an operator registered (`kt admin register-model`) that you may use.",
    no_args_is_help=True,
)


@registered_models_app.command("list")
def registered_models_list(as_json: JsonOpt = False) -> None:
    """The registered models you may name as a teacher (`kt jobs submit --teacher SPEC`) or gallery
    encoder: the spec column, timm:<arch>@registered:<name>."""
    with _client() as client:
        rows = client.registered_models.list()
    if as_json:
        _print_json(rows)
    elif not rows:
        _stderr("No registered models; an operator adds one with `kt admin register-model NAME WEIGHTS`.")
    else:
        _table(
            rows,
            ["spec", "input_size", "norm_eval", "shared", "created_at"],
            "registered models",
            drop=("created_at", "shared", "norm_eval"),
        )


def add_remote_commands(app: typer.Typer) -> None:
    app.command("login")(login)
    app.command("logout")(logout)
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(transfer_sets_app, name="transfer-sets")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(models_app, name="models")
    app.add_typer(galleries_app, name="galleries")
    app.add_typer(registered_models_app, name="registered-models")

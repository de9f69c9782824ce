"""The demo: the README's first command (``bash .ci/demo``) and ``kt demo`` run this, offline.

    python -m service.demo [--out-dir runs/demo] [--seed 0] [--port 0]
    python -m service.demo --url http://127.0.0.1:8000 --api-key kt_... --teacher SPEC [--no-gallery]

The product's premise is a teacher that already knows the visual world (a VFM). Nothing can be
downloaded here, so the demo first makes one: a tiny random-init timm model pretrained for some
seconds on a related task of a generated world (20 texture families), which it registers as the
operator would (``kt admin register-model``'s code). In one torch subprocess
(``python -m kt_train.demo prepare``), while the server starts beside it:

1. a 4-class task of the same world (other labels: checks, rings, spokes, zigzags) with 10 labeled
   images per class, a test set and an unlabeled gallery (every family, plus off-world images);
   the teacher pretrained (kept in ``<out>/teacher`` and reused by a rerun with the same
   arguments), and the gallery embedded by it (what ``kt gallery build`` writes), then registered;
2. ``python -m service.serve`` on a free port (data dir ``<out>/data``) and an API key;
3. over HTTP (``kt_client.Client``): both datasets uploaded, a transfer set curated from the gallery
   (its manifest and report downloaded), then two jobs:
   - **distilled**: the teacher finetuned on the 40 labels, distilled into the student on the
     transfer set, exported and evaluated;
   - **scratch**: the same student trained with the same steps, batch size and learning rate on
     the 40 labeled images only (``recipe.distill.steps: 0``), evaluated the same way;
4. prints the teacher, the distilled and the scratch student's test top-1 from the jobs' metrics,
   and the transfer-set size from the distilled model's card (what distillation read), then stops
   the server.

Exit 0 when both jobs succeeded and the distilled student beat the scratch one by at least
``--min-gain`` points; 1 (with the reason) otherwise. This module never imports torch,
``kt_train`` or ``worker``: they run in subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "canceled")

# The stand-in VFM (kt_train.demo.pretrain_teacher): timm's tiny test ResNet, twice as deep
# (0.64 M parameters), pretrained on the world's 20 families; the student is the plain one (0.37 M).
TEACHER_ARCH = "test_resnet"
TEACHER_KWARGS: dict[str, Any] = {"layers": [2, 2, 2, 2]}
STUDENT = "timm:test_resnet"
IMAGE_SIZE = 32


# --- a small labeled zip for the tests (tests/client, tests/e2e; PIL + numpy only)

CLASSES = ("circle", "square", "stripes", "checker")
COLORS = ((220, 60, 50), (50, 160, 70), (60, 90, 210), (230, 190, 40))


def make_image(kind: str, rng: Any, size: int = 40) -> Any:
    """One ``size`` px RGB image of ``kind`` (a class in ``CLASSES``, or ``"noise"``)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if kind == "noise":
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        return Image.fromarray(arr)
    bg = rng.integers(0, 80, 3)
    arr = np.ones((size, size, 3), dtype=np.float32) * bg
    fg = np.array(COLORS[rng.integers(0, len(COLORS))], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "stripes":
        period = int(rng.integers(4, 9))
        mask = (
            (xx + yy * int(rng.integers(0, 2)) + int(rng.integers(0, period))) // (period // 2 or 1)
        ) % 2 == 0
        arr[mask] = fg
    elif kind == "checker":
        cell = int(rng.integers(4, 9))
        mask = ((xx // cell) + (yy // cell)) % 2 == 0
        arr[mask] = fg
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if kind in ("circle", "square"):
        draw = ImageDraw.Draw(img)
        r = int(rng.integers(size // 5, size // 3))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = tuple(int(v) for v in fg)
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_zip(path: Path, per_class: int, seed: int, size: int = 40) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for cls in CLASSES:
            for i in range(per_class):
                buf = io.BytesIO()
                make_image(cls, rng, size).save(buf, format="PNG")
                zf.writestr(f"{cls}/{i:03d}.png", buf.getvalue())
    return path


# --- subprocesses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kt_command() -> list[str]:
    return [sys.executable, "-m", "kt_train.cli"]


def build_gallery(folder: Path, out: Path, encoder: str, image_size: int) -> None:
    cmd = [
        *kt_command(), "gallery", "build", str(folder), "-o", str(out),
        "--encoder", encoder, "--image-size", str(image_size), "--index", "flat",
        "--device", "cpu", "--overwrite",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, env=offline_env())


def offline_env() -> dict[str, str]:
    """The environment of the demo's processes: the model hubs off (the demo downloads nothing),
    and one torch thread per process unless the caller chose (``KT_THREADS`` / ``OMP_NUM_THREADS``):
    the demo's models are tiny, so more threads gain little, and torch's threads collapse when
    anything else holds the cores (``kt_train/threads.py``: the demo took 6 minutes instead of 1.5
    beside a benchmark on 2 cores)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if not env.get("KT_THREADS") and not env.get("OMP_NUM_THREADS"):
        env["KT_THREADS"] = "1"
    return env


@contextlib.contextmanager
def kt_train_demo_background(*args: str) -> Iterator[Callable[[], dict[str, Any]]]:
    """``python -m kt_train.demo ARGS`` started now (its log lines pass through); yields a function
    that waits for it and returns the JSON line it ends with. Stopped if the block is left early."""
    cmd = [sys.executable, "-m", "kt_train.demo", *args]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=offline_env()
    )

    def result() -> dict[str, Any]:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        return dict(json.loads(stdout.strip().splitlines()[-1]))

    try:
        yield result
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# KT_* variables that only tune performance (threads); the others (database, broker, data dir) are
# the server's own and never leak into it from the caller's environment
PASSED_KT_VARS = ("KT_THREADS",)


def service_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in offline_env().items() if not k.startswith("KT_") or k in PASSED_KT_VARS}
    env["KT_DATA_DIR"] = str(data_dir)
    return env


@contextlib.contextmanager
def embedded_server(data_dir: Path, port: int, timeout: float = 180.0) -> Iterator[str]:
    """``python -m service.serve`` as a subprocess; yields its URL once it printed "ready"."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=service_env(data_dir),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "a") as log:
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                log.write(line)
                log.flush()
                lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"service.serve exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"service.serve did not print 'ready' within {timeout:g} s; see {log_path}"
                )
            try:
                if lines.get(timeout=0.5).strip() == "ready":
                    break
            except queue.Empty:
                continue
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def local_session(data_dir: Path) -> Any:
    """A session on the embedded database of ``data_dir`` (the same one ``service.serve`` uses)."""
    os.environ["KT_DATA_DIR"] = str(data_dir)
    for name in ("KT_DATABASE_URL", "KT_BROKER_URL", "KT_RESULT_BACKEND"):
        os.environ.pop(name, None)
    from service.db.session import init_db, make_engine, make_session_factory
    from service.settings import Settings, get_settings

    get_settings.cache_clear()
    url = Settings().database_url
    init_db(url)
    return make_session_factory(make_engine(url))()


# --- the operator's part: the stand-in VFM, the gallery


def register_teacher(data_dir: Path, pretrained: dict[str, Any]) -> str:
    """Register the pretrained teacher in ``data_dir``'s service (``kt admin register-model``'s
    code: safetensors header, card and shape checked, the file copied); its spec for a job. The
    name carries the weights' hash, so a rerun with the same weights reuses the registration."""
    import hashlib

    from sqlalchemy import select

    from service.db.models import RegisteredModel
    from service.registry import register_model
    from service.settings import Settings

    weights = Path(pretrained["weights"])
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    name = f"demo-vfm-{digest[:10]}"
    with local_session(data_dir) as session:
        row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
        if row is None or row.sha256 != digest:
            if row is not None:  # same name, other weights: cannot happen short of a hash prefix clash
                raise RuntimeError(f"registered model {name} holds other weights; use another --out-dir")
            row = register_model(
                session, Settings(), name, weights, card_path=pretrained["card"], check=_checked(pretrained)
            )
        return f"timm:{row.arch}@registered:{row.name}"


def _checked(pretrained: dict[str, Any]) -> Callable[[str, dict[str, Any], Path], list[str]]:
    """The registration's shape check, answered by the one the preparing process ran on the same
    bytes (``kt_train.weights.check_weights``, what ``register_model``'s own check runs in a fresh
    subprocess; torch was loaded there already). Any other architecture or kwargs: refused."""
    params = pretrained["params"]

    def check(arch: str, kwargs: dict[str, Any], path: Path) -> list[str]:
        if arch != params["arch"] or kwargs != params["model_kwargs"]:
            return [f"the demo checked {params['arch']} {params['model_kwargs']}, not {arch} {kwargs}"]
        return list(pretrained["weights_problems"])

    return check


# --- the HTTP flow


class Demo:
    """The HTTP flow, through ``kt_client.Client`` (errors raise ``kt_client.APIError`` with the
    server's message)."""

    def __init__(self, url: str, api_key: str, out_dir: Path, poll_s: float = 1.0) -> None:
        from kt_client import Client

        self.client = Client(url, api_key, timeout=120)
        self.out_dir = out_dir
        self.poll_s = poll_s

    def upload(self, path: Path, name: str) -> dict[str, Any]:
        return self.client.datasets.upload(path, name=name)

    def poll_job(self, job_id: str, label: str, timeout: float) -> dict[str, Any]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[stage]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TimeElapsedColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(label, total=1.0, stage="queued", eta="?")

            def update(job: dict[str, Any]) -> None:
                eta = job.get("eta_s")
                bar.update(
                    task,
                    completed=1.0 if job["status"] == "succeeded" else float(job.get("progress") or 0.0),
                    stage=job.get("stage") or job["status"],
                    eta=f"{eta:.0f}s" if isinstance(eta, int | float) else "?",
                )

            return self.client.jobs.wait(job_id, poll_s=self.poll_s, timeout=timeout, callback=update)

    def curate(self, dataset_id: str, gallery_id: str, size: int, timeout: float) -> dict[str, Any]:
        ts = self.client.transfer_sets.create(dataset_id, gallery_id, size=size, method="query_balanced")
        job = self.poll_job(ts["job_id"], "curate", timeout)
        ts = self.client.transfer_sets.get(ts["id"])
        if job["status"] != "succeeded" or ts["status"] != "ready":
            raise RuntimeError(f"transfer set {ts['id']} {ts['status']}: {job.get('error')}")
        self.client.transfer_sets.manifest(ts["id"], "jsonl", self.out_dir / "manifest.jsonl")
        self.client.transfer_sets.report(ts["id"], self.out_dir / "report.html")
        return ts

    def train(self, body: dict[str, Any], label: str, timeout: float) -> dict[str, Any]:
        job = self.client.jobs.submit(body)
        print(f"[demo] {label} job {job['id']}: {body['teacher']} -> {body['student']}", flush=True)
        job = self.poll_job(job["id"], label, timeout)
        if job["status"] != "succeeded":
            raise RuntimeError(f"{label} job {job['id']} {job['status']}: {job.get('error')}")
        return job


def parse_steps(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(text)
    return int(parts[0]), int(parts[1])


def distilled_request(
    args: argparse.Namespace, teacher: str, dataset_id: str, test_id: str, transfer_set_id: str | None
) -> dict[str, Any]:
    """The product's job: the server's recipe (budget ``balanced``) at the demo's size: the
    teacher's linear probe and the distillation steps, and the distilled student kept as it is
    (the recipe's default after a task distillation; here the stage is simply off)."""
    probe, steps = parse_steps(args.steps)
    body: dict[str, Any] = {
        "dataset_id": dataset_id,
        "test_dataset_id": test_id,
        "teacher": teacher,
        "student": args.student,
        "image_size": args.image_size,
        "seed": args.seed,
        "recipe": {
            "teacher": {"linear_probe_steps": probe, "full_finetune_steps": 0},
            "distill": {"steps": steps, "lr": args.lr, "batch_size": args.batch_size},
            "finetune_student": {"enabled": False},
        },
        "export_formats": ["safetensors", "onnx"],
    }
    if transfer_set_id is not None:
        body["transfer_set_id"] = transfer_set_id
    return body


def scratch_request(distilled: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The baseline as a job of the same service: no distillation (0 steps), then the student
    trained on the labeled images alone for as many steps, at the same batch size and learning
    rate, as the distilled student learned from the teacher; the teacher is left untrained (it
    teaches nothing here), and the job is evaluated on the same test set."""
    steps, lr = distilled["recipe"]["distill"]["steps"], distilled["recipe"]["distill"]["lr"]
    return {
        **{
            k: distilled[k]
            for k in ("dataset_id", "test_dataset_id", "teacher", "student", "image_size", "seed")
        },
        "recipe": {
            "teacher": {"linear_probe_steps": 0, "full_finetune_steps": 0},
            "distill": {"steps": 0, "cache_mode": "online"},
            "finetune_student": {"steps": steps, "lr": lr, "after_distillation": True},
        },
        "batch_size": {"finetune_student": batch_size},
        "export_formats": ["safetensors"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kt demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the pretraining and the jobs")
    p.add_argument("--port", type=int, default=0, help="port of the embedded server (0: a free one)")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher spec (default: pretrain the demo's stand-in VFM and register it; with --url: required, "
        "e.g. a model an operator registered)",
    )
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--pretrain-steps", type=int, default=300, help="steps pretraining the stand-in VFM")
    p.add_argument("--per-class", type=int, default=10, help="labeled images per class")
    p.add_argument("--test-per-class", type=int, default=25)
    p.add_argument("--gallery", type=int, default=800, help="unlabeled gallery images")
    p.add_argument("--gallery-id", default=None, help="with --url: a registered gallery to curate from")
    p.add_argument(
        "--no-gallery", action="store_true", help="skip the gallery: distill on the labeled images"
    )
    p.add_argument("--transfer-set-size", type=int, default=400)
    p.add_argument("--steps", default="100,300", help="teacher linear-probe steps, distillation steps")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of both students")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of both students (the recipe's)")
    p.add_argument("--no-baseline", action="store_true", help="skip the scratch student (and its check)")
    p.add_argument(
        "--min-gain",
        type=float,
        default=5.0,
        help="points the distilled student must beat the scratch one by (else exit 1)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each job may take")
    args = p.parse_args(argv)
    if args.url and not args.api_key:
        p.error("--url needs --api-key")
    if args.url and not args.teacher:
        p.error(
            "--url needs --teacher: the demo registers its pretrained teacher only on the server it starts "
            "(on yours: python -m kt_train.demo pretrain DIR, then kt admin register-model NAME DIR/model.safetensors)"
        )
    try:
        parse_steps(args.steps)
    except ValueError:
        p.error("--steps takes two comma-separated numbers: teacher linear-probe steps, distillation steps")
    return args


def run(args: argparse.Namespace) -> int:
    out: Path = args.out_dir.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    local = args.url is None
    use_gallery = not args.no_gallery and (local or args.gallery_id is not None)
    pretrain = local and args.teacher is None
    times: dict[str, float] = {}
    t0 = time.monotonic()
    prep_cmd = [
        "prepare", str(out), "--per-class", str(args.per_class), "--test-per-class", str(args.test_per_class),
        "--gallery", str(args.gallery if use_gallery and local else 0),
        "--size", str(args.image_size), "--seed", str(args.seed),
    ]  # fmt: skip
    if pretrain:
        teacher_args = {
            "arch": TEACHER_ARCH, "model_kwargs": TEACHER_KWARGS, "steps": args.pretrain_steps,
            "batch_size": 32, "lr": 0.005,
        }  # fmt: skip
        prep_cmd += ["--teacher", json.dumps(teacher_args)]
        print(
            f"[demo] the stand-in VFM: timm:{TEACHER_ARCH} {TEACHER_KWARGS} pretrained on the generated world; "
            f"the task: 4 classes of it, {args.per_class} labeled images each -> {out}",
            flush=True,
        )
    else:
        print(f"[demo] the task: 4 classes of a generated world -> {out / 'world'}", flush=True)

    jobs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        # the operator's side (a torch process) runs while the server starts beside it
        prepared = stack.enter_context(kt_train_demo_background(*prep_cmd))
        if local:
            url = stack.enter_context(embedded_server(data_dir, args.port or free_port()))
            from service.admin import create_tenant_key

            with local_session(data_dir) as session:
                api_key = create_tenant_key(session, "demo")
            times["server start (beside the set-up)"] = time.monotonic() - t0
            print(f"[demo] service at {url} (data dir {data_dir})", flush=True)
        else:
            url, api_key = args.url, args.api_key
        prep = prepared()
        world, pretrained = prep["world"], prep.get("teacher")
        times["set-up: world, teacher, gallery"] = time.monotonic() - t0

        t = time.monotonic()
        teacher = args.teacher
        if pretrained is not None:
            teacher = register_teacher(data_dir, pretrained)
            print(f"[demo] registered {teacher}", flush=True)
        gallery_id: str | None = args.gallery_id
        if use_gallery and local:
            if "gallery" not in prep:  # a teacher of the caller's: `kt gallery build` with it
                print(f"[demo] kt gallery build ({teacher}) -> {out / 'gallery'}", flush=True)
                build_gallery(Path(world["gallery"]), out / "gallery", teacher, args.image_size)
            from service.admin import register_gallery

            with local_session(data_dir) as session:
                gallery_id = register_gallery(session, out / "gallery", name="demo").id
        times["register teacher, gallery"] = time.monotonic() - t

        demo = Demo(url, api_key, out)
        stack.callback(demo.client.close)
        t = time.monotonic()
        train = demo.upload(Path(world["train"]), "demo-train")
        test = demo.upload(Path(world["test"]), "demo-test")
        times["upload"] = time.monotonic() - t
        print(
            f"[demo] datasets: train {train['id']} ({train['num_images']}), test {test['id']} ({test['num_images']})",
            flush=True,
        )

        ts = None
        if gallery_id is not None:
            t = time.monotonic()
            ts = demo.curate(train["id"], gallery_id, args.transfer_set_size, args.timeout)
            times["transfer set"] = time.monotonic() - t

        t = time.monotonic()
        body = distilled_request(args, teacher, train["id"], test["id"], ts["id"] if ts is not None else None)
        jobs["distilled"] = demo.train(body, "distilled", args.timeout)
        times["distilled job"] = time.monotonic() - t
        model = demo.client.models.get(jobs["distilled"]["model_id"])
        files = {
            fmt: demo.client.models.download(model["id"], fmt, out / f"model.{fmt}")
            for fmt in ("safetensors", "onnx")
        }
        (out / "model_card.json").write_text(json.dumps(model["card"], indent=2, default=str))
        (out / "job.json").write_text(json.dumps(jobs["distilled"], indent=2, default=str))
        if not args.no_baseline:
            t = time.monotonic()
            jobs["scratch"] = demo.train(scratch_request(body, args.batch_size), "scratch", args.timeout)
            times["scratch job"] = time.monotonic() - t
            (out / "scratch_job.json").write_text(json.dumps(jobs["scratch"], indent=2, default=str))

    times["total"] = time.monotonic() - t0
    summary = summarize(args, world, pretrained, teacher, ts, jobs, model["card"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, jobs, times, out, files)
    problem = verdict(summary, args.min_gain)
    if problem is not None:
        print(f"[demo] FAILED: {problem}", file=sys.stderr, flush=True)
        return 1
    return 0


def verdict(summary: dict[str, Any], min_gain: float) -> str | None:
    """Why the demo failed (None: it did not): the distilled student must beat the scratch one by
    ``min_gain`` points, when there is a scratch one."""
    scratch = summary.get("scratch_student")
    if scratch is None:
        return None
    distilled = summary["distilled_student"]["top1"]
    if distilled - scratch["top1"] < min_gain:
        return (
            f"the distilled student ({distilled:.1f}%) does not beat the scratch student "
            f"({scratch['top1']:.1f}%) by {min_gain:g} points"
        )
    return None


def _top1(job: dict[str, Any], role: str) -> float:
    """The service's test top-1 (percent) of ``role`` (student / teacher) in a job's metrics."""
    try:
        return float(job["metrics"]["test"][role]["top1"])
    except (KeyError, TypeError, ValueError) as err:
        raise RuntimeError(
            f"job {job['id']} has no test top-1 for its {role}: metrics {job.get('metrics')}"
        ) from err


def summarize(
    args: argparse.Namespace,
    world: dict[str, Any],
    pretrained: dict[str, Any] | None,
    teacher: str,
    ts: dict[str, Any] | None,
    jobs: dict[str, dict[str, Any]],
    card: dict[str, Any],
) -> dict[str, Any]:
    """The numbers the summary prints, each from where the service keeps it."""
    distilled = jobs["distilled"]
    lineage = card.get("lineage") or {}
    recipe = distilled["request"]["recipe"]
    classes = world["classes"]
    out: dict[str, Any] = {
        "task": {
            "classes": classes,
            "labeled": world["train_images"],
            "test": world["test_images"],
            "chance_top1": round(100 / len(classes), 1),
        },
        "teacher": {
            "spec": teacher,
            "top1": _top1(distilled, "teacher"),
            "job": distilled["id"],
            "linear_probe_steps": recipe["teacher"]["linear_probe_steps"],
        },
        "distilled_student": {
            "spec": distilled["request"]["student"],
            "top1": _top1(distilled, "student"),
            "job": distilled["id"],
            "model": distilled.get("model_id"),
            "steps": recipe["distill"]["steps"],
            # what distillation read: the model card's lineage, written by the distill stage
            "transfer_set_size": lineage.get("transfer_set_size"),
            "method": lineage.get("method"),
            "parameters": card.get("num_params"),
        },
    }
    if pretrained is not None:
        out["teacher"]["pretraining"] = {
            k: pretrained.get(k) for k in ("task", "pretext_accuracy", "seconds", "parameters")
        }
        out["teacher"]["pretraining"]["steps"] = pretrained["params"]["steps"]
    if ts is not None:
        out["transfer_set"] = {
            "id": ts["id"],
            "curated": (ts.get("summary") or {}).get("size", ts["size"]),
            "asked": args.transfer_set_size,
            "gallery": world.get("gallery_images") or None,  # None: the server's gallery (--gallery-id)
            "gallery_id": ts["gallery_id"],
        }
    if "scratch" in jobs:
        scratch = jobs["scratch"]
        out["scratch_student"] = {
            "spec": scratch["request"]["student"],
            "top1": _top1(scratch, "student"),
            "job": scratch["id"],
            "steps": scratch["request"]["recipe"]["finetune_student"]["steps"],
        }
    return out


def _params(entry: dict[str, Any]) -> str:
    n = entry.get("parameters")
    return f" ({n / 1e6:.2f} M parameters)" if isinstance(n, int | float) else ""


def print_summary(
    summary: dict[str, Any],
    jobs: dict[str, dict[str, Any]],
    times: dict[str, float],
    out: Path,
    files: dict[str, Path],
) -> None:
    task, teacher, student = summary["task"], summary["teacher"], summary["distilled_student"]
    pre = teacher.get("pretraining")
    lines = [
        "",
        "=== vfm-kt demo summary ===",
        f"task:              {len(task['classes'])} classes ({', '.join(task['classes'])}), "
        f"{task['labeled']} labeled images, {task['test']} test images; chance {task['chance_top1']:.0f}%",
        f"teacher:           {teacher['spec']}"
        + (
            f" ({pre['parameters'] / 1e6:.2f} M parameters, pretrained for {pre['steps']} steps on "
            f"{pre['task']}: {100 * pre['pretext_accuracy']:.0f}% there)"
            if pre
            else ""
        ),
    ]
    ts = summary.get("transfer_set")
    size = student["transfer_set_size"]
    if ts is not None:
        curated = f" ({ts['curated']} curated)" if ts["curated"] != size else ""
        lines.append(
            f"transfer set:      {ts['id']}: {size} unlabeled images distilled on (the model card's lineage)"
            + curated
            + (
                f", curated from a {ts['gallery']}-image gallery"
                if ts["gallery"]
                else f" from gallery {ts['gallery_id']}"
            )
        )
    else:
        lines.append(f"transfer set:      {size} images distilled on (the model card's lineage)")
    lines += [
        "test top-1 (the service's evaluation of each job):",
        f"  teacher            {teacher['top1']:5.1f}%  linear probe on the labeled images "
        f"({teacher['linear_probe_steps']} steps), job {teacher['job']}",
        f"  distilled student  {student['top1']:5.1f}%  {student['spec']}{_params(student)}, {student['steps']} "
        f"steps distilling on the transfer set, job {student['job']}",
    ]
    scratch = summary.get("scratch_student")
    if scratch is not None:
        lines.append(
            f"  scratch student    {scratch['top1']:5.1f}%  {scratch['spec']}, the same {scratch['steps']} steps "
            f"on the labeled images only, job {scratch['job']}"
        )
        lines.append(f"distilled - scratch: {student['top1'] - scratch['top1']:+.1f} points")
    lines.append("stage times (jobs):")
    for label, job in jobs.items():
        parts = []
        for stage, value in (job.get("stage_timings") or {}).items():
            secs = value.get("seconds", value.get("duration_s")) if isinstance(value, dict) else value
            parts.append(f"{stage} {secs:.1f} s" if isinstance(secs, int | float) else f"{stage} {value}")
        lines.append(f"  {label:<18} " + ", ".join(parts))
    lines.append("wall times (demo):")
    lines += [f"  {name:<30} {secs:.1f} s" for name, secs in times.items()]
    lines.append("files:")
    for what in ("manifest.jsonl", "report.html"):
        if (out / what).is_file():
            lines.append(f"  {out / what}")
    lines += [f"  {path}" for path in files.values()]
    lines += [f"  {out / 'model_card.json'}", f"  {out / 'summary.json'}"]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    from kt_client import APIError, KTError

    args = parse_args(argv)
    try:
        return run(args)
    except APIError as err:
        print(
            f"[demo] error: {err.method} {err.url} -> {err.status_code}: {err.detail}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except (RuntimeError, TimeoutError, KTError, subprocess.CalledProcessError) as err:
        print(f"[demo] error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

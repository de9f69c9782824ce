"""The README's main job, end to end over HTTP, on the embedded default (or an existing server).

    python -m service.demo [--out-dir runs/demo-service] [--port 0]
    python -m service.demo --url http://127.0.0.1:8000 --api-key kt_... [--no-gallery]

1. makes a small synthetic 4-class labeled set (a zip), a test set (a zip) and an unlabeled folder;
2. builds a gallery from the folder (``kt gallery build``, a subprocess) and registers it;
3. starts ``python -m service.serve`` on a free port (data dir ``<out>/data``) and creates an API key;
4. uploads both zips (through ``kt_client.Client``), curates a transfer set (downloads its manifest and report), runs a training
   job with a progress bar, downloads the model (safetensors, onnx), prints a summary and stops
   the server. Exit 0 when the job succeeded, 1 (with its error) when it did not.

This module never imports torch, ``kt_train`` or ``worker``: they run in subprocesses.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLASSES = ("circle", "square", "stripes", "checker")
COLORS = ((220, 60, 50), (50, 160, 70), (60, 90, 210), (230, 190, 40))
TERMINAL = ("succeeded", "failed", "canceled")


# --- synthetic data (PIL + numpy only)


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


def write_unlabeled(folder: Path, count: int, seed: int, size: int = 40) -> Path:
    """``count`` images: the four kinds and unrelated noise, mixed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = (*CLASSES, "noise")
    for i in range(count):
        make_image(kinds[i % len(kinds)], rng, size).save(folder / f"u{i:04d}.png")
    return folder


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
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


def service_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    env["KT_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
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


# --- the HTTP flow


class Demo:
    """The HTTP flow, through ``kt_client.Client`` (errors raise ``kt_client.APIError`` with the
    server's message)."""

    def __init__(self, url: str, api_key: str, out_dir: Path, poll_s: float = 1.0) -> None:
        from kt_client import Client

        self.client = Client(url, api_key, timeout=120)
        self.out_dir = out_dir
        self.poll_s = poll_s

    def upload(self, zip_path: Path, name: str) -> dict[str, Any]:
        return self.client.datasets.upload(zip_path, name=name)

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


def job_request(
    args: argparse.Namespace, dataset_id: str, test_id: str, transfer_set_id: str | None
) -> dict[str, Any]:
    """The job: the server's recipe (budget `balanced`) with the demo's step counts, distilling on
    the transfer set curated just before (or, without one, on the labeled images)."""
    t, d, s = (int(v) for v in args.steps.split(","))
    body: dict[str, Any] = {
        "dataset_id": dataset_id,
        "test_dataset_id": test_id,
        "teacher": args.teacher,
        "student": args.student,
        "image_size": args.image_size,
        "recipe": {
            # linear probe only: the demo's default models are random-init, so it shows the plumbing
            "teacher": {"linear_probe_steps": t, "full_finetune_steps": 0},
            "distill": {"steps": d},
            "finetune_student": {"steps": s},
        },
        "export_formats": ["safetensors", "onnx"],
    }
    if transfer_set_id is not None:
        body["transfer_set_id"] = transfer_set_id
    return body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo-service"))
    p.add_argument("--port", type=int, default=0, help="port of the embedded server (0: a free one)")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument("--api-key", default=None, help="API key for --url")
    p.add_argument("--gallery-id", default=None, help="with --url: a registered gallery to curate from")
    p.add_argument(
        "--no-gallery", action="store_true", help="skip the gallery: distill on the labeled images"
    )
    p.add_argument("--teacher", default="timm:test_vit")
    p.add_argument("--student", default="timm:test_efficientnet")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=25)
    p.add_argument("--unlabeled", type=int, default=400)
    p.add_argument("--transfer-set-size", type=int, default=200)
    p.add_argument("--steps", default="100,300,100", help="finetune_teacher,distill,finetune_student steps")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each job may take")
    args = p.parse_args(argv)
    if args.url and not args.api_key:
        p.error("--url needs --api-key")
    if len(args.steps.split(",")) != 3:
        p.error("--steps takes three comma-separated numbers")
    return args


def run(args: argparse.Namespace) -> int:
    out: Path = args.out_dir.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.monotonic()
    print(f"[demo] synthetic data -> {out}", flush=True)
    train_zip = write_zip(out / "train.zip", args.per_class, seed=0)
    test_zip = write_zip(out / "test.zip", args.test_per_class, seed=1)
    use_gallery = not args.no_gallery and (args.url is None or args.gallery_id is not None)
    if use_gallery and args.url is None:
        write_unlabeled(out / "unlabeled", args.unlabeled, seed=2)
    times["data"] = time.monotonic() - t0

    gallery_id: str | None = args.gallery_id
    data_dir = out / "data"
    if use_gallery and args.url is None:
        t = time.monotonic()
        print(f"[demo] kt gallery build ({args.teacher}) -> {out / 'gallery'}", flush=True)
        build_gallery(out / "unlabeled", out / "gallery", args.teacher, args.image_size)
        from service.admin import register_gallery

        with local_session(data_dir) as session:
            gallery_id = register_gallery(session, out / "gallery", name="demo").id
        times["gallery"] = time.monotonic() - t

    with contextlib.ExitStack() as stack:
        if args.url is None:
            t = time.monotonic()
            url = stack.enter_context(embedded_server(data_dir, args.port or free_port()))
            from service.admin import create_tenant_key

            with local_session(data_dir) as session:
                api_key = create_tenant_key(session, "demo")
            times["server start"] = time.monotonic() - t
            print(f"[demo] service at {url} (data dir {data_dir})", flush=True)
        else:
            url, api_key = args.url, args.api_key
        demo = Demo(url, api_key, out)
        stack.callback(demo.client.close)

        t = time.monotonic()
        train = demo.upload(train_zip, "demo-train")
        test = demo.upload(test_zip, "demo-test")
        times["upload"] = time.monotonic() - t
        print(
            f"[demo] datasets: train {train['id']} ({train['num_images']}), test {test['id']} ({test['num_images']})"
        )

        ts = None
        if gallery_id is not None:
            t = time.monotonic()
            ts = demo.curate(train["id"], gallery_id, args.transfer_set_size, args.timeout)
            times["transfer set"] = time.monotonic() - t

        t = time.monotonic()
        body = job_request(args, train["id"], test["id"], ts["id"] if ts is not None else None)
        job = demo.client.jobs.submit(body)
        print(f"[demo] job {job['id']}: {args.teacher} -> {args.student}", flush=True)
        job = demo.poll_job(job["id"], "train", args.timeout)
        times["job"] = time.monotonic() - t
        if job["status"] != "succeeded":
            print(f"[demo] job {job['id']} {job['status']}: {job.get('error')}", file=sys.stderr, flush=True)
            return 1
        files = {}
        for fmt in ("safetensors", "onnx"):
            files[fmt] = demo.client.models.download(job["model_id"], fmt, out / f"model.{fmt}")
        model = demo.client.models.get(job["model_id"])
        (out / "model_card.json").write_text(json.dumps(model["card"], indent=2, default=str))
        (out / "job.json").write_text(json.dumps(job, indent=2, default=str))

    times["total"] = time.monotonic() - t0
    print_summary(job, ts, times, out, files)
    return 0


def _accuracy(metrics: dict[str, Any], who: str) -> str:
    """The test accuracy of ``who`` from the job metrics, wherever the pipeline put it."""
    found: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, int | float) and who in path and ("acc" in path or "top1" in path):
            found.append((path, node))

    walk(metrics, "")
    if not found:
        return "n/a"
    path, value = sorted(found, key=lambda kv: ("test" not in kv[0], "top1" not in kv[0], len(kv[0])))[0]
    return f"{value:.1f}% ({path})" if value > 1 else f"{100 * value:.1f}% ({path})"


def print_summary(
    job: dict[str, Any], ts: dict[str, Any] | None, times: dict[str, float], out: Path, files: dict[str, Path]
) -> None:
    metrics = job.get("metrics") or {}
    lines = [
        "",
        "=== vfm-kt demo summary ===",
        f"job:               {job['id']} ({job['status']}), model {job.get('model_id')}",
        f"teacher accuracy:  {_accuracy(metrics, 'teacher')}",
        f"student accuracy:  {_accuracy(metrics, 'student')}",
    ]
    if ts is not None:
        lines.append(f"transfer set:      {ts['id']} ({ts.get('summary', {}).get('size', ts['size'])} items)")
    lines.append("stage times (job):")
    for stage, value in (job.get("stage_timings") or {}).items():
        secs = value.get("seconds", value.get("duration_s")) if isinstance(value, dict) else value
        lines.append(
            f"  {stage:<18} {secs:.1f} s" if isinstance(secs, int | float) else f"  {stage:<18} {value}"
        )
    lines.append("wall times (demo):")
    lines += [f"  {name:<18} {secs:.1f} s" for name, secs in times.items()]
    lines.append("files:")
    for what in ("manifest.jsonl", "report.html"):
        if (out / what).is_file():
            lines.append(f"  {out / what}")
    lines += [f"  {path}" for path in files.values()]
    lines.append(f"  {out / 'model_card.json'}")
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

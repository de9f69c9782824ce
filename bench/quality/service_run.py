"""Arm A5 through the HTTP service, as a user would (BENCHMARKS.md §1, issue 12 §4).

    python bench/quality/service_run.py                 # seeds 0 1, the full test split
    python bench/quality/service_run.py --seeds 0 --test-limit 3000
    python bench/quality/service_run.py --seeds 0 & python bench/quality/service_run.py --seeds 1  # one per core

Seeds measured by separate runs merge in ``quality.json`` (a seed measured again replaces its row).

Per seed: a fresh data dir; the operator registers the A5 gallery (the one bench/quality/run.py
built, bench/work/retrieval/gallery) and the proxy teacher (``kt admin register-model``); then,
over HTTP with ``kt_client``: upload the 100 labeled images and the test images as zips, submit a
job with only the dataset, the test dataset, the gallery, the teacher
(``timm:mobilenetv2_100@registered:proxy-mnv2``) and the student — the service's default recipe
(budget ``balanced``) and nothing else —, wait, download the ONNX model and evaluate it with
onnxruntime on the test images at the model card's input size. The result goes into
``bench/results/quality.json`` as ``service_run.A5`` (next to the library's A5, the bar is
within 1.5 points).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench/quality"))

import run as quality  # noqa: E402  (bench/quality/run.py: splits, machine facts)

from service import demo  # noqa: E402  (the embedded server and a local admin session)

log = logging.getLogger("bench.service_run")
TEACHER_NAME = "proxy-mnv2"


def write_split_zip(src_zip: Path, names: list[str], out: Path) -> Path:
    """The images of ``names`` (entries of ``src_zip``) as an ImageFolder zip: what a user uploads."""
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    with zipfile.ZipFile(src_zip) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for n in names:
            dst.writestr(n, src.read(n))
    tmp.replace(out)
    return out


def onnx_accuracy(onnx_path: Path, card: dict[str, Any], test_zip: Path) -> dict[str, Any]:
    """Top-1 of the downloaded ONNX model in onnxruntime on ``test_zip``, preprocessed as the model
    card's ``preprocessing`` says (the transform the service's evaluate stage builds from it)."""
    import onnxruntime as ort
    import torch

    from kt_train.data import load_labeled
    from kt_train.models import load_checkpoint  # noqa: F401  (keeps kt_train's registry importable)
    from kt_train.transforms import EvalTransform

    classes = list(card["classes"])
    pre = card["preprocessing"]  # what a deployment follows: the eval transform is built from it
    transform = EvalTransform.from_preprocessing(pre)
    size = transform.size
    ds = load_labeled(str(test_zip))
    ds_classes = list(ds.classes or [])
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = total = 0
    batch: list[np.ndarray] = []
    labels: list[int] = []

    def flush() -> None:
        nonlocal correct, total
        x = np.stack(batch).astype(np.float32) / 255.0
        logits = sess.run(None, {name: (x - mean) / std})[0]
        pred = logits.argmax(1)
        correct += int(sum(classes[p] == ds_classes[y] for p, y in zip(pred, labels, strict=True)))
        total += len(labels)
        batch.clear()
        labels.clear()

    for i in range(len(ds)):
        img = ds.load_image(i)
        t = transform(img)
        batch.append(t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
        labels.append(int(ds.items[i].label))
        if len(batch) == 256:
            flush()
    if batch:
        flush()
    return {"test_acc": 100.0 * correct / max(1, total), "images": total, "input_size": size}


def stack_lock(path: Path) -> Any:
    """An exclusive lock for writing ``path`` (seeds run in parallel processes merge into one file)."""
    import fcntl

    (ROOT / "bench/work").mkdir(parents=True, exist_ok=True)
    f = open(ROOT / "bench/work" / f"{path.name}.lock", "w")  # noqa: SIM115  (held until the caller closes it)
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def run_seed(
    args: argparse.Namespace, seed: int, shared: Path, work: Path, zips: dict[str, Path]
) -> dict[str, Any]:
    from kt_client import Client
    from service.admin import create_tenant_key, register_gallery
    from service.registry import register_model
    from service.settings import Settings

    data_dir = work / f"seed{seed}" / "data"
    out = work / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    weights = shared / "models/mobilenetv2_100.tflite_imagenet.safetensors"
    with demo.local_session(data_dir) as session:  # the operator, once
        gallery = register_gallery(session, args.gallery, name="eurosat-a5")
        register_model(session, Settings(), TEACHER_NAME, weights, norm_eval=True)
        api_key = create_tenant_key(session, "bench")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(demo.embedded_server(data_dir, demo.free_port()))
        client = stack.enter_context(contextlib.closing(Client(url, api_key, timeout=300)))
        train = client.datasets.upload(zips["labeled"], name="eurosat-10-per-class")
        test = client.datasets.upload(zips["test"], name="eurosat-test")
        body = {
            "dataset_id": train["id"],
            "test_dataset_id": test["id"],
            "gallery_id": gallery.id,
            "teacher": f"timm:mobilenetv2_100@registered:{TEACHER_NAME}",
            "student": args.student,
            "budget": args.budget,
            "seed": seed,
            "export_formats": ["safetensors", "onnx"],
        }
        job = client.jobs.submit(body)
        log.info("seed %d: job %s submitted: %s", seed, job["id"], json.dumps(body))
        last = [0.0]

        def progress(j: dict[str, Any]) -> None:
            if time.monotonic() - last[0] > 60:
                last[0] = time.monotonic()
                log.info(
                    "seed %d: %s %s %.0f%% eta %s",
                    seed,
                    j["status"],
                    j.get("stage"),
                    100 * (j.get("progress") or 0),
                    j.get("eta_s"),
                )

        job = client.jobs.wait(job["id"], poll_s=5, timeout=args.timeout, callback=progress)
        (out / "job.json").write_text(json.dumps(job, indent=2, default=str))
        if job["status"] != "succeeded":
            raise SystemExit(f"seed {seed}: job {job['id']} {job['status']}: {job.get('error')}")
        model = client.models.get(job["model_id"])
        card = model["card"]
        (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
        onnx_path = client.models.download(job["model_id"], "onnx", out / "model.onnx")
    measured = onnx_accuracy(onnx_path, card, zips["test"])
    service_metric = (job.get("metrics") or {}).get("test", {})
    row = {
        "seed": seed,
        "job_id": job["id"],
        "test_acc": round(measured["test_acc"], 2),
        "eval_images": measured["images"],
        "input_size": measured["input_size"],
        "service_reported": service_metric,
        "wall_s": round(time.perf_counter() - t0, 1),
        "stage_timings": job.get("timings"),
        "request": body | {"gallery_id": "(registered eurosat-a5)"},
    }
    log.info("seed %d: ONNX test top-1 %.2f on %d images", seed, row["test_acc"], row["eval_images"])
    return row


def write_report(result: dict[str, Any], path: Path) -> None:
    """``bench/results/quality_service_run.md``: the service run beside the library's A5."""
    m = result["machine"]
    lines = [
        "# Arm A5 through the HTTP service (bench/quality/service_run.py)",
        "",
        f"- command: `{result['command']}` (seeds merged from separate processes, one per core)",
        f"- date: {result['date']}; git commit {result['git_commit']}",
        f"- machine: {m.get('cpu')} x{m.get('cores')} cores, {m.get('device')}; python {m.get('python')}, "
        f"torch {m.get('torch')}, timm {m.get('timm')}, faiss {m.get('faiss')}",
        "- path: `kt serve` (embedded default), `kt admin register-model` + gallery registration, then "
        "over HTTP: upload labeled + test zips, submit (dataset, test dataset, gallery, teacher, student, "
        "budget only), wait, download ONNX, evaluate in onnxruntime with the card's preprocessing",
        "",
        "| seed | ONNX test top-1 | service metrics.test | test images | input px | wall |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["per_seed"]:
        reported = r.get("service_reported") or {}
        svc = (reported.get("student") or reported).get("top1")
        svc_txt = f"{svc:.2f}" if isinstance(svc, (int, float)) else "-"  # kt_train's top1, in percent
        lines.append(
            f"| {r['seed']} | {r['test_acc']:.2f} | {svc_txt} | {r['eval_images']} | {r['input_size']} "
            f"| {r['wall_s'] / 60:.0f} min |"
        )
    lib = result.get("library_A5")
    lines += [
        "",
        f"Mean {result['test_acc']:.2f} ± {result['test_acc_std']:.2f} over {result['seeds']} seeds; "
        + (
            f"library A5 (bench/quality/run.py) {lib:.2f}: difference {result['diff_to_library']:+.2f} "
            f"(bar: within 1.5 points: {'PASS' if abs(result['diff_to_library']) <= 1.5 else 'FAIL'})."
            if lib is not None
            else "no library A5 in quality.json to compare with."
        ),
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--gallery", default=str(ROOT / "bench/work/retrieval/gallery"))
    ap.add_argument("--student", default="timm:mobilenetv3_small_050")
    ap.add_argument("--budget", default="balanced")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--out", default=str(ROOT / "bench/results/quality.json"))
    ap.add_argument("--report", action="store_true", help="only rewrite the .md from quality.json")
    args = ap.parse_args(argv)
    report_md = ROOT / "bench/results/quality_service_run.md"
    if args.report:
        write_report(json.loads(Path(args.out).read_text())["service_run"]["A5"], report_md)
        print(report_md.read_text())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shared = Path(args.shared).resolve()
    if not (Path(args.gallery) / "gallery.json").exists():
        raise SystemExit(
            f"no gallery at {args.gallery}: run bench/quality/run.py --arms A5 first (it builds it)"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    work = ROOT / "bench/work/service_run" / f"{stamp}-seeds{'-'.join(map(str, args.seeds))}"
    splits = quality.prepare_splits(shared, work / "splits", 10, args.test_limit, seed=0)
    src = shared / "data/eurosat/eurosat_rgb.zip"
    zips = {
        k: write_split_zip(src, splits[k].read_text().split(), work / f"{k}.zip") for k in ("labeled", "test")
    }
    t0 = time.perf_counter()
    rows = [run_seed(args, s, shared, work, zips) for s in args.seeds]
    wall = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    lock = stack_lock(out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    # seeds run in separate processes (one per core) merge: a seed measured again replaces its row
    earlier = (doc.get("service_run") or {}).get("A5", {}).get("per_seed", [])
    mine = {r["seed"] for r in rows}
    rows = sorted([r for r in earlier if r["seed"] not in mine] + rows, key=lambda r: r["seed"])
    if len({r["eval_images"] for r in rows}) > 1:
        raise SystemExit(f"seeds were evaluated on different test sets: {[r['eval_images'] for r in rows]}")
    accs = [r["test_acc"] for r in rows]
    result = {
        "test_acc": round(statistics.mean(accs), 2),
        "test_acc_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
        "seeds": len(rows),
        "per_seed": rows,
        "eval_images": rows[0]["eval_images"],
        "command": "python bench/quality/service_run.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": quality.git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": wall,
        "machine": quality.machine(),
    }
    doc.setdefault("service_run", {})["A5"] = result
    lib = (doc.get("arms") or {}).get("A5", {}).get("test_acc")
    if lib is not None:
        result["library_A5"] = lib
        result["diff_to_library"] = round(result["test_acc"] - lib, 2)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    write_report(result, report_md)
    lock.close()
    print(json.dumps({k: v for k, v in result.items() if k != "per_seed"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

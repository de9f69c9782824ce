"""Training throughput (BENCHMARKS.md §3): distillation with the teacher online vs cached outputs.

    python bench/throughput/run.py                      # CPU, the EuroSAT A4 setup, seed 0
    python bench/throughput/run.py --seeds 0 1 2        # accuracy over more seeds
    bash bench/gpu_check.sh                             # the same comparison on a CUDA machine

The setup is arm A4 of bench/quality (same config file): the proxy-VFM teacher finetuned on 10
labels per class, distilled into the student on the unlabeled EuroSAT pool, then finetuned.

Two measurements, in one run:
- images/s: short distillation windows, online and cached *alternating* (after one warm-up window
  of each), so both modes see the same machine load; the median window of each mode is reported.
  The cache is built once before the windows; its build time is reported separately.
- accuracy: per seed, the full distillation schedule (same steps, batch and seed) online and
  cached, each followed by the same student finetune, evaluated on the test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kt_train import pipeline  # noqa: E402
from kt_train.config import DatasetRef, set_key  # noqa: E402
from kt_train.train import resolve_device  # noqa: E402

log = logging.getLogger("bench.throughput")


def _quality() -> Any:
    """bench/quality/run.py (its splits, config and evaluation helpers), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench/quality/run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Q = _quality()
arm_config, git_commit, machine, prepare_splits, test_acc = (
    Q.arm_config,
    Q.git_commit,
    Q.machine,
    Q.prepare_splits,
    Q.test_acc,
)


class GpuSampler:
    """Mean GPU utilization and peak memory while a block runs (NVML; no-op without it)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.util, self.mem = period, [], 0.0
        self._stop = threading.Event()
        self._nvml: Any = None
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            except Exception:  # pragma: no cover - NVML missing or not permitted
                self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            u = self._nvml.nvmlDeviceGetUtilizationRates(self._h)
            m = self._nvml.nvmlDeviceGetMemoryInfo(self._h)
            self.util.append(float(u.gpu))
            self.mem = max(self.mem, m.used / 2**30)
            self._stop.wait(self.period)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._t.join()

    def summary(self) -> dict[str, Any]:
        if not self.util:
            return {}
        return {"gpu_util_pct": round(statistics.mean(self.util), 1), "gpu_mem_gib": round(self.mem, 2)}


def distill_cfg(
    base: dict[str, Any], out: Path, refs: dict[str, DatasetRef], mode: str, cache_dir: Path, **kw
):
    d = json.loads(json.dumps(base))
    d["distill"]["cache"] = {**d["distill"].get("cache", {}), "mode": mode, "dir": str(cache_dir)}
    for k, v in kw.items():
        set_key(d, k, v)
    return arm_config(d, out, train=refs["labeled"], val=None, transfer=refs["unlabeled_target"])


def window(
    base, refs, inputs, mode: str, steps: int, scratch: Path, cache_dir: Path, k: int
) -> dict[str, Any]:
    out = scratch / f"{mode}{k}"
    cfg = distill_cfg(base, out, refs, mode, cache_dir, **{"distill.steps": steps, "distill.warmup_steps": 0})
    with GpuSampler() as g:
        res = pipeline.distill(cfg, dict(inputs), out / "distill")
    shutil.rmtree(out, ignore_errors=True)
    t = res["timings"]["distill"]
    row = {"img_s": t["steady_images_per_s"], "data_wait_share": t["data_wait_share"], **g.summary()}
    if "teacher_cache" in res:
        row["cache"] = res["teacher_cache"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--config", default=str(ROOT / "bench/quality/config.yaml"))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--teacher", help="teacher spec (default: the config's proxy VFM)")
    ap.add_argument("--teacher-size", type=int, help="teacher input size (default: the config's)")
    ap.add_argument("--views", type=int, default=None, help="cached views per image (default: the config's)")
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--windows", type=int, default=3, help="timed windows per mode (after one warm-up each)")
    ap.add_argument("--window-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=None, help="distillation batch (default: the config's)")
    ap.add_argument(
        "--test-limit", type=int, default=None, help="evaluate on a seeded subset of the test split"
    )
    ap.add_argument(
        "--skip-accuracy", action="store_true", help="images/s only (e.g. for an untrained big teacher)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: the config's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student")
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--work", default=str(ROOT / "bench/work/throughput"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/throughput"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kt_train.train").setLevel(logging.WARNING)
    started = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    commit = git_commit()

    shared = Path(args.shared).resolve()
    base, bench = Q.load_spec(args.config, shared)
    base.pop("curate", None)
    if args.teacher:
        base["teacher"]["model"] = args.teacher
    if args.teacher:
        base["teacher"].pop("norm_eval", None)
    if args.teacher_size:
        base["teacher"]["image_size"] = args.teacher_size
    base["device"] = args.device
    for ov in args.set:
        key, value = ov.split("=", 1)
        set_key(base, key, yaml.safe_load(value))
    cache_cfg = base["distill"].setdefault("cache", {})
    if args.views:
        cache_cfg["views"] = args.views
    if args.topk:
        cache_cfg["topk"] = args.topk
    if args.batch_size:
        base["distill"]["batch_size"] = args.batch_size
    if args.precision:
        base["precision"] = args.precision
    if args.compile:
        base["compile"] = True
    if args.num_workers is not None:
        base["data"]["num_workers"] = args.num_workers
    device = resolve_device(args.device)
    work = Path(args.work) / device.type
    splits = prepare_splits(shared, work / "splits", bench["labels_per_class"], args.test_limit, seed=0)
    zip_ = str(shared / "data/eurosat/eurosat_rgb.zip")
    refs = {
        "labeled": DatasetRef(path=zip_, split=str(splits["labeled"])),
        "unlabeled_target": DatasetRef(path=zip_, split=str(splits["unlabeled_target"])),
        "test": DatasetRef(path=zip_, split=str(splits["test"])),
    }
    cache_dir = work / "teacher_cache"
    resolved = distill_cfg(base, work, refs, "cached", cache_dir)
    views, topk = resolved.distill.cache.views, resolved.distill.cache.topk
    steps, batch = resolved.distill.steps, resolved.distill.batch_size
    log.info("device %s; views %d, topk %d; %d steps x %d", device, views, topk, steps, batch)

    teachers: dict[int, dict[str, Any]] = {}
    # Stage directories keyed by the teacher recipe: a run with another teacher never reuses one.
    tkey = hashlib.sha1(
        json.dumps([base["teacher"], base["finetune_teacher"], args.skip_accuracy], sort_keys=True).encode()
    ).hexdigest()[:10]

    def teacher_for(seed: int) -> dict[str, Any]:
        if seed not in teachers:
            cfg = arm_config({**base, "seed": seed}, work, train=refs["labeled"], val=None)
            out = work / f"seed{seed}" / f"teacher_{tkey}"
            if args.skip_accuracy:  # throughput only: a teacher with an untrained head is as fast
                cfg = arm_config(
                    {
                        **base,
                        "seed": seed,
                        "finetune_teacher": {"linear_probe": {"steps": 1}, "full_finetune": {"steps": 0}},
                    },
                    work,
                    train=refs["labeled"],
                    val=None,
                )
            t = pipeline.finetune_teacher(cfg, {}, out)
            teachers[seed] = {"teacher": t["checkpoint"], "classes": t["classes"]}
        return teachers[seed]

    # ---- images/s: interleaved windows
    inputs = teacher_for(args.seeds[0])
    scratch = work / "windows"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    with GpuSampler() as g:
        first = window(base, refs, inputs, "cached", 1, scratch, cache_dir, 0)  # builds the cache
    cache = {**first["cache"], "wall_s": round(time.perf_counter() - t0, 2), **g.summary()}
    log.info("cache built: %s", cache)
    rows: dict[str, list[dict[str, Any]]] = {"online": [], "cached": []}
    for k in range(args.windows + 1):
        for mode in ("online", "cached"):
            r = window(base, refs, inputs, mode, args.window_steps, scratch, cache_dir, k + 1)
            log.info("window %d %s: %s", k, mode, r)
            if k > 0:  # the first window of each mode is a warm-up
                rows[mode].append(r)
    tp: dict[str, Any] = {}
    for mode, rs in rows.items():
        tp[mode] = {
            "img_s": round(statistics.median(r["img_s"] for r in rs), 1),
            "img_s_windows": [r["img_s"] for r in rs],
            "data_wait_share": round(statistics.median(r["data_wait_share"] for r in rs), 3),
        }
        if rs and "gpu_util_pct" in rs[0]:
            tp[mode]["gpu_util_pct"] = round(statistics.median(r["gpu_util_pct"] for r in rs), 1)
            tp[mode]["gpu_mem_gib"] = max(r["gpu_mem_gib"] for r in rs)
    ratio = tp["cached"]["img_s"] / tp["online"]["img_s"]
    log.info(
        "online %.1f img/s, cached %.1f img/s: %.2fx", tp["online"]["img_s"], tp["cached"]["img_s"], ratio
    )

    # ---- accuracy: the full schedule, online and cached, same seed
    acc: list[dict[str, Any]] = []
    if not args.skip_accuracy:
        for seed in args.seeds:
            inputs = teacher_for(seed)
            row: dict[str, Any] = {"seed": seed}
            for mode in ("online", "cached"):
                out = work / f"seed{seed}" / mode
                shutil.rmtree(out, ignore_errors=True)
                cfg = distill_cfg({**base, "seed": seed}, out, refs, mode, cache_dir)
                t1 = time.perf_counter()
                d = pipeline.distill(cfg, dict(inputs), out / "distill")
                distill_wall = time.perf_counter() - t1
                f = pipeline.finetune_student(
                    cfg, {**inputs, "student": d["checkpoint"]}, out / "finetune_student"
                )
                row[mode] = {
                    "distill_wall_s": round(distill_wall, 1),
                    "distill_img_s": d["timings"]["distill"]["images_per_s"],
                    "data_wait_share": d["timings"]["distill"]["data_wait_share"],
                    "distill_acc": round(test_acc(d["checkpoint"], refs["test"], device), 2),
                    "test_acc": round(test_acc(f["checkpoint"], refs["test"], device), 2),
                }
                if "teacher_cache" in d:
                    row[mode]["cache_built"] = d["teacher_cache"]["built"]
                    row[mode]["cache_build_s"] = d["teacher_cache"]["build_seconds"]
                log.info("seed %d %s: %s", seed, mode, row[mode])
            acc.append(row)

    def mean(mode: str, key: str) -> float | None:
        vals = [r[mode][key] for r in acc]
        return round(statistics.mean(vals), 2) if vals else None

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    result: dict[str, Any] = {
        "online_img_s": tp["online"]["img_s"],
        "cached_img_s": tp["cached"]["img_s"],
        "speedup": round(ratio, 2),
        "online_test_acc": mean("online", "test_acc"),
        "cached_test_acc": mean("cached", "test_acc"),
        "device": gpu or "cpu",
        "throughput": tp,
        "cache_build": cache,
        "accuracy": acc,
        "setup": {
            "teacher": base["teacher"]["model"].replace(str(shared), "${shared}"),
            "teacher_size": resolved.teacher.image_size,
            "student": base["student"]["model"],
            "student_size": resolved.student.image_size,
            "transfer_images": len(Path(splits["unlabeled_target"]).read_text().split()),
            "test_images": len(Path(splits["test"]).read_text().split()),
            "steps": steps,
            "batch_size": batch,
            "views": views,
            "topk": topk,
            "precision": resolved.precision,
            "compile": resolved.compile,
            "num_workers": resolved.data.num_workers,
            "window_steps": args.window_steps,
            "windows": args.windows,
            "seeds": args.seeds,
        },
        "command": "python "
        + " ".join(
            [
                str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0],
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write(result, Path(args.out))
    return 0


def write(r: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    s, tp, c, m = r["setup"], r["throughput"], r["cache_build"], r["machine"]
    lines = [
        "# Training throughput: online teacher vs cached teacher outputs",
        "",
        f"`{r['command']}`",
        "",
        f"- date: {r['date']} · commit {r['git_commit']} · wall {r['wall_s'] / 60:.1f} min",
        f"- machine: {m['cpu']} ({m['cores']} threads), device **{r['device']}**; python {m['python']}, "
        f"torch {m['torch']}, timm {m['timm']}",
        f"- teacher `{s['teacher']}` at {s['teacher_size']} px; student `{s['student']}` at {s['student_size']} px; "
        f"precision {s['precision']}, compile {s['compile']}, loader workers {s['num_workers']}",
        f"- transfer set: {s['transfer_images']} unlabeled EuroSAT images (arm A4); distillation {s['steps']} steps "
        f"x {s['batch_size']}; cache: {s['views']} views per image, top-{s['topk']} fp16 logits",
        "",
        f"## Images/s ({s['windows']} alternating windows of {s['window_steps']} steps per mode, after a warm-up each; median; each window timed from the end of its first step)",
        "",
        "| mode | images/s | windows | data-wait share of step time |"
        + (" GPU util % |" if "gpu_util_pct" in tp["online"] else ""),
        "|---|---:|---|---:|" + ("---:|" if "gpu_util_pct" in tp["online"] else ""),
    ]
    for mode in ("online", "cached"):
        t = tp[mode]
        lines.append(
            f"| {mode} | **{t['img_s']}** | {', '.join(str(x) for x in t['img_s_windows'])} | {t['data_wait_share']} |"
            + (f" {t['gpu_util_pct']} |" if "gpu_util_pct" in t else "")
        )
    lines += [
        "",
        f"**cached / online = {r['speedup']}x** (bar: >= 3x on CPU).",
        "",
        f"Cache build (once per teacher x transfer set x augmentation; reused by every student): "
        f"{c['views']} views x {s['transfer_images']} images in {c['build_seconds']} s "
        f"({c['build_views_per_s']} views/s).",
        "",
    ]
    if r["accuracy"]:
        lines += [
            f"## Accuracy (full schedule: {s['steps']} distillation steps, then the same student finetune; "
            f"test split, {s['test_images']} images)",
            "",
            "| seed | mode | distill stage wall s | distill img/s | after distillation % | after finetune % |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for row in r["accuracy"]:
            for mode in ("online", "cached"):
                x = row[mode]
                wall = f"{x['distill_wall_s']}" + (
                    f" (incl. {x['cache_build_s']} s cache build)" if x.get("cache_built") else ""
                )
                lines.append(
                    f"| {row['seed']} | {mode} | {wall} | {x['distill_img_s']} | {x['distill_acc']} | **{x['test_acc']}** |"
                )
        d = r["cached_test_acc"] - r["online_test_acc"]
        lines += [
            "",
            f"Mean after finetune: online **{r['online_test_acc']}**, cached **{r['cached_test_acc']}** "
            f"(difference {d:+.2f} points; bar: within ±0.5).",
            "",
        ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

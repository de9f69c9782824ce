"""Transfer quality on EuroSAT (BENCHMARKS.md section 1): arms A0-A4, mean +- std over seeds.

    python bench/quality/run.py            # full: 2 seeds, the whole 18,900-image test split
    python bench/quality/run.py --quick    # 1 seed, fewer steps, a 3,000-image test subset
    python bench/quality/run.py --eval-on val_tune --set distill.temperature=2   # tuning, never on test

Every arm runs through kt_train's own stage functions with the hyperparameters of
bench/quality/config.yaml. Stage outputs are kept under bench/work/ (keyed by the resolved
config), so a rerun with the same settings resumes instead of retraining.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kt_train import pipeline  # noqa: E402
from kt_train.config import DatasetRef, parse_config, set_key  # noqa: E402
from kt_train.curate import read_manifest  # noqa: E402
from kt_train.evaluate import evaluate_model  # noqa: E402
from kt_train.models import load_checkpoint  # noqa: E402
from kt_train.recipe import merge, recipe  # noqa: E402
from kt_train.train import resolve_device  # noqa: E402

ARMS = ("A0", "A1", "A2", "A3", "A4", "A5")
ARM_TEXT = {
    "A0": "teacher: proxy VFM finetuned on the labeled images (ceiling)",
    "A1": "student from scratch, finetuned on the labeled images only",
    "A2": "task-agnostic: student features matched to frozen proxy-VFM features on the generic set, then finetune",
    "A3": "task-oriented KT on a generic transfer set (Tiny-ImageNet); kept as distilled (finetune_student.after_distillation: false)",
    "A4": "task-oriented KT on unlabeled target data (pool - labeled); kept as distilled",
    "A5": "task-oriented KT on a retrieval-curated transfer set from the ~7%-in-domain gallery; kept as distilled",
}
log = logging.getLogger("bench.quality")


def load_spec(config: str | Path, shared: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(base, bench)`` of a benchmark config: the service's default recipe at ``bench.budget``
    (kt_train/recipe.py) with the file's task keys (models, data, single overrides) merged in."""
    spec = yaml.safe_load(Path(config).read_text())
    bench = spec.pop("bench")
    base = merge(recipe(bench.get("budget", "balanced")), spec)
    base["teacher"]["model"] = base["teacher"]["model"].replace("${shared}", str(shared))
    return base, bench


def resolved_sizes(base: dict[str, Any], images: str | Path) -> tuple[int, int]:
    """The (teacher, student) input sides ``image_size: auto`` gives on the task's images (EuroSAT
    tiles and CIFAR images all have one size, so the whole archive answers as the labeled set would)."""
    data = {**base.get("data", {}), "train": DatasetRef(path=str(images)).model_dump()}
    cfg = pipeline.resolve_sizes(parse_config({**base, "data": data}))
    return int(cfg.teacher.image_size or 0), int(cfg.student.image_size or 0)


def pin_sizes(base: dict[str, Any], images: str | Path) -> None:
    """Replace ``auto`` sizes in ``base`` by the sides they resolve to, so the work directories are
    keyed by the real sizes (a changed sizing rule never reuses a model trained at the old size)."""
    if "auto" in (base["teacher"].get("image_size"), base["student"].get("image_size")):
        teacher, student = resolved_sizes(base, images)
        for side, size in (("teacher", teacher), ("student", student)):
            if base[side].get("image_size") == "auto":
                base[side]["image_size"] = size


def prepare_splits(
    shared: Path, work: Path, labels_per_class: int, test_limit: int | None, seed: int, task: str = "eurosat"
) -> dict[str, Path]:
    """Split files of the protocol. EuroSAT: labeled, pool - labeled, val_tune (100 per class), test.
    CIFAR-10 (the second task): a seeded split of cifar10_test.zip, ``labels_per_class`` labeled per
    class and the other images test; no unlabeled target data and no tuning split (no per-task tuning)."""
    work.mkdir(parents=True, exist_ok=True)
    if task == "cifar10":
        import zipfile

        with zipfile.ZipFile(shared / "data/gallery/cifar10_test.zip") as z:
            names = sorted(n for n in z.namelist() if not n.endswith("/"))
        by_class: dict[str, list[str]] = {}
        for n in names:
            by_class.setdefault(n.split("/", 1)[0], []).append(n)
        g = torch.Generator().manual_seed(1234)  # the split's own seed, fixed: every run sees it
        labeled_set: set[str] = set()
        for c in sorted(by_class):
            perm = torch.randperm(len(by_class[c]), generator=g)[:labels_per_class].tolist()
            labeled_set.update(by_class[c][i] for i in perm)
        out = {"labeled": sorted(labeled_set), "test": [n for n in names if n not in labeled_set]}
    else:
        splits = shared / "data/eurosat/splits"
        read = lambda name: [ln.strip() for ln in (splits / name).read_text().splitlines() if ln.strip()]  # noqa: E731
        labeled = read(f"labeled_{labels_per_class}_per_class.txt")
        out = {
            "labeled": labeled,
            "unlabeled_target": [p for p in read("pool.txt") if p not in set(labeled)],
            "val_tune": read("val_tune.txt"),
            "test": read("test.txt"),
        }
    if test_limit:
        test = out["test"]
        g = torch.Generator().manual_seed(seed)
        out["test"] = [test[i] for i in sorted(torch.randperm(len(test), generator=g)[:test_limit].tolist())]
    paths = {}
    for name, lines in out.items():
        paths[name] = work / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


TASKS: dict[str, dict[str, Any]] = {
    "eurosat": {
        "zip": "data/eurosat/eurosat_rgb.zip",
        "arms": ARMS,
        "result": "bench/results/quality",
        "title": "EuroSAT",
    },
    "cifar10": {  # BENCHMARKS.md §1, second task: the default recipe, no per-task tuning
        "zip": "data/gallery/cifar10_test.zip",
        "arms": ("A0", "A1", "A3", "A5"),
        "result": "bench/results/quality_cifar10",
        "title": "CIFAR-10",
        "arm_text": {
            "A5": "task-oriented KT on a retrieval-curated transfer set from the Tiny-ImageNet gallery "
            "(no CIFAR-10 image in it); kept as distilled",
        },
    },
}


def parse_arm(arm: str) -> tuple[str, int | None, int | None]:
    """``"A5:1000"`` -> ("A5", size 1000, None); ``"A4@12000"`` -> ("A4", None, 12000 distill steps)."""
    name, _, steps = arm.partition("@")
    name, _, size = name.partition(":")
    return name, int(size) if size else None, int(steps) if steps else None


def in_domain(source: str) -> bool:
    """A gallery item from the task's own domain (the EuroSAT part of the A5 gallery)."""
    return "eurosat" in source.lower()


def arm_config(base: dict[str, Any], out_dir: Path, **data: DatasetRef | None) -> Any:
    d = copy.deepcopy(base)
    d["out_dir"] = str(out_dir)
    d.setdefault("data", {})
    for k, v in data.items():
        d["data"][k] = v.model_dump() if v is not None else None
    return parse_config(d, "bench/quality/config.yaml")


STUDENT_SIDE = ("student", "distill", "finetune_student", "curate")
DISTILL_SIDE = ("student", "distill", "curate")


def config_key(d: Any) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def teacher_key(base: dict[str, Any]) -> str:
    """The work directory's key: what decides the teacher (and so its output caches). Student-side
    changes (student, distillation, finetune, curation) reuse the teacher and the caches."""
    return config_key({k: v for k, v in base.items() if k not in STUDENT_SIDE})


def student_key(base: dict[str, Any]) -> str:
    """An arm directory's key: what decides the distilled student (the finetune after it has its own
    key, so finetune variants reuse the distillation)."""
    return config_key({k: base.get(k) for k in DISTILL_SIDE})


def ccfg_dict(base: dict[str, Any]) -> dict[str, Any]:
    return {"curate": base.get("curate"), "seed": base.get("seed")}


def test_acc(ckpt: str, ref: DatasetRef, device: torch.device) -> float:
    """Top-1 of a checkpoint on ``ref``; remembered beside the checkpoint (keyed by its bytes' size
    and mtime and by the split's lines), so a resumed run re-reports a finished arm in seconds."""
    split = Path(ref.split).read_bytes() if ref.split else b""
    key = hashlib.sha1(
        json.dumps([ref.path, Path(ckpt).stat().st_size, Path(ckpt).stat().st_mtime_ns]).encode() + split
    ).hexdigest()[:16]
    memo = Path(ckpt).with_name(Path(ckpt).name + f".eval-{key}.json")
    if memo.exists():
        return float(json.loads(memo.read_text())["top1"])
    model, meta = load_checkpoint(ckpt)
    ds = pipeline.open_labeled(ref, what="test", classes=list(meta["classes"]))
    top1 = evaluate_model(model.to(device), ds, device=device, batch_size=256)["top1"]
    memo.write_text(json.dumps({"top1": top1, "split": ref.split, "images": len(ds)}))
    return top1


def run_seed(
    seed: int,
    base: dict[str, Any],
    refs: dict[str, DatasetRef],
    arms: list[str],
    work: Path,
    device: torch.device,
    eval_ref: DatasetRef,
    gallery: str | None = None,
    size: int | None = None,
    finetune: bool = True,
    tune_ref: DatasetRef | None = None,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate ``arms`` for one seed. Arm "A5:N" is A5 with a transfer set of N items
    (the accuracy-vs-size curve); A5 curates with the ``curate:`` section of the config."""
    res: dict[str, dict[str, Any]] = {}
    base = {**base, "seed": seed}
    common = {"train": refs["labeled"], "val": None}
    t0 = time.perf_counter()
    cfg = arm_config(base, work, **common)
    teacher = pipeline.finetune_teacher(cfg, {}, work / "teacher")
    t_teacher = time.perf_counter() - t0
    classes = teacher["classes"]

    def tune_acc(ckpt: str) -> float | None:
        # val_tune beside test, from the same model: choices are read off val_tune, never off test
        return None if tune_ref is None else round(test_acc(ckpt, tune_ref, device), 2)

    if "A0" in arms:
        res["A0"] = {
            "test_acc": test_acc(teacher["checkpoint"], eval_ref, device),
            "val_tune_acc": tune_acc(teacher["checkpoint"]),
            "wall_s": time.perf_counter() - t0,
        }
        log.info("seed %d A0 %.2f", seed, res["A0"]["test_acc"])
    plan: dict[str, Any] = {
        "A1": None,
        "A2": ("task_agnostic", refs["generic"]),
        "A3": ("task_oriented", refs["generic"]),
    }
    if "unlabeled_target" in refs:  # EuroSAT's pool - labeled; CIFAR-10 has no unlabeled target data
        plan["A4"] = ("task_oriented", refs["unlabeled_target"])
    for arm in arms:
        name, n, steps = parse_arm(arm)
        if name not in plan and name != "A5":
            continue
        t1 = time.perf_counter()
        row: dict[str, Any] = {}
        inputs: dict[str, Any] = {"teacher": teacher["checkpoint"], "classes": classes}
        arm_dir = work / f"{arm.replace(':', '_n').replace('@', '_steps')}-{student_key(base)}"
        arm_base = base if steps is None else {**base, "distill": {**base["distill"], "steps": steps}}
        if steps is not None:
            row["distill_steps"] = steps
        transfer_plan = plan.get(name)
        if name == "A5":
            n = n or size
            if gallery is None or n is None:
                raise SystemExit("arm A5 needs the gallery (bench/retrieval/real.py builds it)")
            ccfg = arm_config(
                {**base, "curate": {**base.get("curate", {}), "gallery": gallery, "size": n}}, work, **common
            )
            # one curated set per (seed, size): the steps-curve arms train on the set A5 trained on
            curate_dir = work / f"{'A5' if n == size else f'A5_n{n}'}-curate-{config_key(ccfg_dict(base))}"
            cur = pipeline.curate(ccfg, inputs, curate_dir)
            row["curate_s"] = cur["summary"]["seconds"]
            row["transfer_set_size"] = cur["size"]
            row["per_class_fill"] = cur["summary"].get("per_class_fill")
            rows = read_manifest(cur["manifest"])
            row["in_domain_share"] = round(
                100.0 * sum(in_domain(r.get("source", "")) for r in rows) / max(1, len(rows)), 2
            )
            transfer_plan = ("task_oriented", DatasetRef(path=cur["manifest"]))
        if transfer_plan is not None:
            method, transfer = transfer_plan
            cfg = arm_config(
                {**arm_base, "distill": {**arm_base.get("distill", {}), "method": method}},
                work,
                **common,
                transfer=transfer,
            )
            d = pipeline.distill(cfg, inputs, arm_dir / "distill")
            if method == "task_oriented":
                row["distill_acc"] = test_acc(d["checkpoint"], eval_ref, device)
                row["distill_val_tune_acc"] = tune_acc(d["checkpoint"])
            inputs["student"] = d["checkpoint"]
            row["distill_s"] = d["timings"]["distill"]["seconds"]
            row["distill_img_s"] = d["timings"]["distill"]["images_per_s"]
            tc = d.get("teacher_cache") or (d.get("lineage") or {}).get("teacher_cache") or {}
            if tc.get("built"):
                row["cache_build_s"] = tc.get("build_seconds")
        if row.get("distill_acc") is not None and not finetune:
            row["test_acc"] = row["distill_acc"]
        else:
            cfg = arm_config(base, work, **common)
            f = pipeline.finetune_student(
                cfg, inputs, arm_dir / f"finetune_student-{config_key(base.get('finetune_student'))}"
            )
            row["test_acc"] = test_acc(f["checkpoint"], eval_ref, device)
            row["val_tune_acc"] = tune_acc(f["checkpoint"])
            check = (load_checkpoint(f["checkpoint"])[1].get("lineage") or {}).get("finetune_check")
            if check:  # finetune_student.after_distillation auto: what the job's own check chose
                row["finetune_check"] = check
        row["wall_s"] = time.perf_counter() - t1 + (t_teacher if name in ("A3", "A4", "A5") else 0.0)
        res[arm] = row
        log.info(
            "seed %d %s %s",
            seed,
            arm,
            {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()},
        )
    return res


def aggregate(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    arms: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        rows = [r[arm] for r in per_seed if arm in r]
        if not rows:
            continue
        out: dict[str, Any] = {"seeds": len(rows), "what": ARM_TEXT[arm]}
        for key in ("test_acc", "distill_acc", "val_tune_acc", "distill_val_tune_acc"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                out[key] = round(statistics.mean(vals), 2)
                out[f"{key}_std"] = round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0
                out[f"{key}_per_seed"] = vals
        out["wall_s"] = round(statistics.mean(r["wall_s"] for r in rows), 1)
        for key in ("transfer_set_size", "in_domain_share", "cache_build_s", "distill_s", "curate_s"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                out[key] = round(statistics.mean(vals), 2)
        checks = [r["finetune_check"] for r in rows if r.get("finetune_check")]
        if checks:
            out["finetune_check_per_seed"] = [c.get("reason") for c in checks]
            out["finetuned_seeds"] = sum(bool(c.get("finetune")) for c in checks)
        if rows[0].get("per_class_fill"):
            out["per_class_fill_seed0"] = rows[0]["per_class_fill"]
        if any("distill_img_s" in r for r in rows):
            out["distill_img_s"] = round(
                statistics.mean(r["distill_img_s"] for r in rows if "distill_img_s" in r), 1
            )
        arms[arm] = out
    return arms


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "faiss": _version("faiss"),
        "platform": platform.platform(),
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Sections of the result file that other tools write (bench/quality/service_run.py): kept on rewrite.
FOREIGN_SECTIONS = ("service_run",)


def write_results(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.with_suffix(".json").is_file():
        try:
            before = json.loads(out.with_suffix(".json").read_text())
        except ValueError:
            before = {}
        for key in FOREIGN_SECTIONS:
            if key in before and key not in result:
                result[key] = before[key]
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    arms = result["arms"]
    lines = [
        f"# Transfer quality — {result.get('title', 'EuroSAT')}, {result['labels_per_class']} labels per class",
        "",
        f"`{result['command']}`",
        "",
        f"- date: {result['date']} · commit {result['git_commit']} · wall {result['wall_s'] / 60:.1f} min",
        f"- machine: {result['machine']['cpu']} ({result['machine']['cores']} threads, {result['machine']['device']}); "
        f"torch {result['machine']['torch']}, timm {result['machine']['timm']}",
        f"- teacher `{result['teacher']}`; student `{result['student']}`",
        f"- evaluated on: {result['eval_split']} ({result['eval_images']} images); seeds {result['seeds']}; "
        f"transfer-set size {result['transfer_set_size']} (A2/A3 generic)"
        + (f", {result['unlabeled_target_size']} (A4)" if result["unlabeled_target_size"] else ""),
        "",
        "| arm | after distillation | final (test_acc; after the finetune where the recipe runs one) | val_tune (distill / final) | wall s | what |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        da = f"{r['distill_acc']:.2f} ± {r['distill_acc_std']:.2f}" if "distill_acc" in r else "–"
        vt = f"{r.get('distill_val_tune_acc', '–')} / {r.get('val_tune_acc', '–')}"
        lines.append(
            f"| {arm} | {da} | **{r['test_acc']:.2f} ± {r['test_acc_std']:.2f}** | {vt} | {r['wall_s']:.0f} | {r['what']} |"
        )
    checked = {arm: r for arm, r in arms.items() if r.get("finetune_check_per_seed")}
    if checked:
        lines += ["", "The student finetune's check per seed (`finetune_student.after_distillation: auto`):", ""]
        lines += [
            f"- {arm}: finetuned in {r['finetuned_seeds']} of {len(r['finetune_check_per_seed'])} seeds: "
            + "; ".join(r["finetune_check_per_seed"])
            for arm, r in checked.items()
        ]
    if result.get("merged_arms"):
        lines += [
            "",
            "Arms not measured by this run, kept from earlier runs (each with the recipe of its commit; "
            "an arm that depends on a recipe key changed since is to be re-run): "
            + ", ".join(
                f"{a} (commit {m.get('git_commit')}, {m.get('date')}"
                + (f", {m['distill_steps']:,} distillation steps" if m.get("distill_steps") else "")
                + ")"
                for a, m in result["merged_arms"].items()
            ),
        ]
    if result.get("curve"):
        lines += [
            "",
            f"A5: accuracy vs transfer-set size (same {result['config']['distill']['steps']} distillation "
            "steps; the paper's Figure 5):",
            "",
            "| size | after distillation | after finetune | seeds |",
            "|---:|---:|---:|---|",
        ]
        for c in result["curve"]:
            lines.append(
                f"| {c['size']} | {c.get('distill_acc')} | {c['test_acc']} | {c.get('seeds', 'seed ' + str(c.get('seed')))} |"
            )
    if result.get("steps_curve"):
        lines += [
            "",
            "Accuracy vs distillation steps (patience; same transfer sets, cache and finetune):",
            "",
            "| arm | steps | test after distillation | test after finetune | val_tune (distill / finetune) | seeds |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for c in result["steps_curve"]:
            lines.append(
                f"| {c['arm']} | {c['steps']} | {c.get('distill_acc')} | {c['test_acc']} | "
                f"{c.get('distill_val_tune_acc')} / {c.get('val_tune_acc')} | "
                f"{c.get('seeds', 'seed ' + str(c.get('seed')))} |"
            )
    a5 = arms.get("A5") or {}
    if a5.get("per_class_fill_seed0"):
        fill = a5["per_class_fill_seed0"]
        lines += [
            "",
            f"A5 transfer set: {a5.get('transfer_set_size')} items (asked {result['transfer_set_size']}), "
            f"{a5.get('in_domain_share')}% from the task's domain; how full each class's quota got (seed 0):",
            "",
            "| class | quota | selected | fill |",
            "|---|---:|---:|---:|",
            *[f"| {c} | {f['quota']} | {f['selected']} | {100 * f['fill']:.0f}% |" for c, f in fill.items()],
        ]
    lines += ["", "Bars (BENCHMARKS.md §1):", ""]
    for name, ok, fig in result["bars"]:
        lines.append(f"- {'PASS' if ok else 'FAIL'} {name}: {fig}")
    lines += [
        "",
        "Hyperparameters (bench/quality/config.yaml, resolved):",
        "",
        "```yaml",
        yaml.safe_dump(result["config"], sort_keys=False).strip(),
        "```",
        "",
    ]
    if result.get("notes"):
        lines += [*result["notes"], ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(arms)
        curve = result.get("curve") or []
        steps_curve = result.get("steps_curve") or []
        panels = 1 + bool(curve) + bool(steps_curve)
        fig, axes = plt.subplots(1, panels, figsize=(4.2 + 3.8 * panels, 3.6), squeeze=False)
        ax = axes[0][0]
        if steps_curve:
            sx = axes[0][-1]
            for name, col in (("A4", "#4a7"), ("A5", "#a5c")):
                pts = [c for c in steps_curve if c["arm"] == name]
                if pts:
                    sx.plot(
                        [c["steps"] for c in pts], [c["test_acc"] for c in pts], "o-", color=col, label=name
                    )
            if "A0" in arms:
                sx.axhline(arms["A0"]["test_acc"], ls="--", color="#555", label="A0 (teacher)")
                sx.axhline(arms["A0"]["test_acc"] - 3, ls=":", color="#555", label="A0 - 3")
            sx.set_xscale("log")
            sx.set_xlabel("distillation steps (batch 64)")
            sx.set_ylabel("test top-1 (%)")
            sx.set_title("accuracy vs distillation steps")
            sx.legend(fontsize=8)
        if curve:
            cx = axes[0][1]
            cx.plot(
                [c["size"] for c in curve], [c["test_acc"] for c in curve], "o-", color="#a5c", label="A5"
            )
            for ref, col in (("A4", "#4a7"), ("A3", "#7ac")):
                if ref in arms:
                    cx.axhline(arms[ref]["test_acc"], ls="--", color=col, label=ref)
            cx.set_xlabel("transfer-set size")
            cx.set_ylabel("test top-1 (%)")
            cx.set_title("A5 vs transfer-set size")
            cx.legend()
        ax.bar(
            names,
            [arms[a]["test_acc"] for a in names],
            yerr=[arms[a]["test_acc_std"] for a in names],
            color=["#555", "#999", "#c97", "#7ac", "#4a7", "#a5c"][: len(names)],
            capsize=4,
        )
        for i, a in enumerate(names):
            ax.text(i, arms[a]["test_acc"] + 1, f"{arms[a]['test_acc']:.1f}", ha="center", fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(
            f"{result.get('title', 'EuroSAT')}, {result['labels_per_class']} labels/class, {result['seeds']} seed(s)"
        )
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        log.warning("matplotlib missing: no plot")


def bars(arms: dict[str, dict[str, Any]], task: str = "eurosat") -> list[tuple[str, bool, str]]:
    """BENCHMARKS.md §1: EuroSAT's bars, or the second task's (CIFAR-10)."""
    g = {a: r["test_acc"] for a, r in arms.items()}
    out = []

    def gap(name: str, a: str, b: str, op: str, bar: float) -> None:
        if {a, b} <= g.keys():
            d = g[a] - g[b]
            out.append(
                (name, d >= bar if op == ">=" else d <= bar, f"{d:.2f} ({a}={g[a]:.2f} {b}={g[b]:.2f})")
            )

    if task == "cifar10":
        gap("A5 - A1 >= 8", "A5", "A1", ">=", 8)
        gap("A0 - A5 <= 5", "A0", "A5", "<=", 5)
        return out
    if "A0" in g:
        out.append(("A0 >= 85", g["A0"] >= 85, f"A0={g['A0']:.2f}"))
    gap("A4 - A1 >= 8", "A4", "A1", ">=", 8)
    gap("A3 >= A1", "A3", "A1", ">=", 0)
    if {"A3", "A2"} <= g.keys():
        out.append(("A3 > A2", g["A3"] > g["A2"], f"A3={g['A3']:.2f} A2={g['A2']:.2f}"))
    gap("A5 >= A4 - 1", "A5", "A4", ">=", -1)
    gap("A5 - A3 >= 8", "A5", "A3", ">=", 8)
    gap("A0 - A4 <= 3", "A0", "A4", "<=", 3)
    gap("A0 - A5 <= 3", "A0", "A5", "<=", 3)
    return out


def _exit_when_orphaned(parent: int, every_s: float = 2.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)  # the run's main process died: stop training for nobody


def _one_thread(parent: int) -> None:
    """A seed process's initializer: one intra-op thread, and a thread that ends the process within
    2 s of the run's main process dying, so a killed run leaves no orphan training on. (Not
    PR_SET_PDEATHSIG: the kernel sends it when the *thread* that started the process ends, and the
    pool starts its replacement processes from a thread that ends at ``terminate()``; killed there,
    an idle replacement holding the task queue's lock hangs the pool's shutdown.)"""
    import threading

    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="orphan-watch").start()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kt_train.train").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="1 seed, shorter schedules, 3,000 test images (<= 10 min)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: all of the task's)")
    ap.add_argument("--config", default=str(ROOT / "bench/quality/config.yaml"))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--teacher", help="teacher model spec (default: the proxy VFM in shared/models)")
    ap.add_argument("--student", help="student model spec")
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="seeds run in parallel processes, one thread each (default: one per seed, up to the core count)",
    )
    ap.add_argument(
        "--curve",
        default="",
        help="A5 at these extra transfer-set sizes, seed 0 (accuracy vs size, the paper's Figure 5), e.g. 1000,2500",
    )
    ap.add_argument(
        "--steps-curve",
        default="",
        help="A4 and A5 at these distillation step counts, seed 0 (accuracy vs steps), e.g. 800,4000,12000",
    )
    ap.add_argument(
        "--task",
        choices=tuple(TASKS),
        default="eurosat",
        help="eurosat (the protocol), or cifar10 (the second task: arms A0, A1, A3, A5, no tuning)",
    )
    ap.add_argument(
        "--gallery",
        default=None,
        help="gallery for A5 (default: bench/work/retrieval/gallery for eurosat, built by "
        "bench/retrieval/real.py; bench/work/retrieval_cifar10/gallery for cifar10; built when missing)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the arms of the existing result file that this run does not measure (marked as such)",
    )
    ap.add_argument("--eval-on", choices=("test", "val_tune"), default="test")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument(
        "--out",
        default=None,
        help="result path stem (default bench/results/quality, or bench/work/ when tuning)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kt_train.train").setLevel(logging.WARNING)

    shared = Path(args.shared).resolve()
    base, bench = load_spec(args.config, shared)
    if args.quick:
        for k, v in bench["quick"].items():
            set_key(base, k, v)
    for ov in args.set:
        k, v = ov.split("=", 1)
        set_key(base, k, yaml.safe_load(v))
    if args.teacher:
        base["teacher"]["model"] = args.teacher
    if args.student:
        base["student"]["model"] = args.student
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    test_limit = args.test_limit or (bench["quick_test_images"] if args.quick else None)
    task = TASKS[args.task]
    arms = [a.strip() for a in (args.arms or ",".join(task["arms"])).split(",") if a.strip()]
    if args.task == "cifar10" and args.eval_on != "test":
        raise SystemExit("cifar10 has no tuning split: the second task runs the default recipe untuned")

    pin_sizes(base, shared / task["zip"])
    key = teacher_key(base)
    work = ROOT / "bench/work/quality" / (key if args.task == "eurosat" else f"{args.task}-{key}")
    splits = prepare_splits(
        shared, work / "splits", bench["labels_per_class"], test_limit, seed=0, task=args.task
    )
    zip_ = str(shared / task["zip"])
    refs = {
        "labeled": DatasetRef(path=zip_, split=str(splits["labeled"])),
        "generic": DatasetRef(
            path=str(shared / "data/gallery/tinyimagenet_50k.zip"), max_items=bench["transfer_set_size"]
        ),
    }
    if "unlabeled_target" in splits:
        refs["unlabeled_target"] = DatasetRef(path=zip_, split=str(splits["unlabeled_target"]))
    eval_ref = DatasetRef(path=zip_, split=str(splits[args.eval_on]))
    # labels of the unlabeled sets are never read: load_unlabeled ignores folder names
    device = resolve_device("auto")
    (work / f"config-{config_key({k: base.get(k) for k in STUDENT_SIDE})}.json").write_text(
        json.dumps(base, indent=2)
    )
    log.info("work dir %s; arms %s; seeds %s; eval on %s", work, arms, seeds, args.eval_on)

    commit = git_commit()  # the code that runs, not whatever is checked out when it ends
    t0 = time.perf_counter()
    curve = [int(x) for x in args.curve.split(",") if x.strip()]
    steps_curve = [int(x) for x in args.steps_curve.split(",") if x.strip()]
    gallery = None
    if any(a.startswith("A5") for a in arms) or curve:
        sys.path.insert(0, str(ROOT / "bench/retrieval"))
        import real as retrieval  # bench/retrieval/real.py: the A5 gallery

        default_gallery = "retrieval" if args.task == "eurosat" else f"retrieval_{args.task}"
        gpath = Path(args.gallery or ROOT / "bench/work" / default_gallery / "gallery")
        meta = gpath / "gallery.json"
        if not meta.exists() or json.loads(meta.read_text()).get("status") != "complete":
            log.info("building the A5 gallery in %s (resuming a partial build)", gpath)
            sources = None if args.task == "eurosat" else [str(shared / "data/gallery/tinyimagenet_50k.zip")]
            retrieval.ensure_gallery(shared, base, gpath.parent, sources=sources)
        gallery = str(gpath)
    # Tasks (seed, arms): each seed's main arms first, so a seed's teacher is trained (and cached)
    # before the curve tasks of that seed start in other processes.
    steps_arms = [f"{a}@{n}" for n in steps_curve for a in ("A4", "A5") if a in arms]
    tasks = (
        [(s, arms) for s in seeds]
        + [(seeds[0], [f"A5:{n}"]) for n in curve]
        + [(seeds[0], [a]) for a in steps_arms]
    )
    finetune = bool(bench.get("finetune_student", True))
    tune_ref = (
        DatasetRef(path=zip_, split=str(splits["val_tune"]))
        if "val_tune" in splits and args.eval_on == "test"
        else None
    )
    run_args = [
        (
            s, base, refs, a, work / f"seed{s}", device, eval_ref, gallery,
            bench["transfer_set_size"], finetune, tune_ref,
        )
        for s, a in tasks
    ]  # fmt: skip
    jobs = max(1, min(args.jobs or (os.cpu_count() or 1), len(tasks)))
    if jobs == 1:
        per_task = [run_seed(*a) for a in run_args]
    else:
        # One process per task with one thread each: small convnets barely speed up with a second
        # intra-op thread, and two processes use both cores fully.
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(
            jobs, initializer=_one_thread, initargs=(os.getpid(),), maxtasksperchild=1
        ) as pool:
            per_task = pool.starmap(run_seed, run_args, chunksize=1)
    per_seed = [r for r, (_, a) in zip(per_task, tasks, strict=True) if a is arms]
    arms_res = aggregate(per_seed)
    for arm, text in task.get("arm_text", {}).items():
        if arm in arms_res:
            arms_res[arm]["what"] = text
    if base.get("finetune_student", {}).get("after_distillation") is True:  # say what ran, not the default
        for arm in ("A3", "A4", "A5"):
            if arm in arms_res:
                what = arms_res[arm]["what"].split("; kept as distilled")[0]
                arms_res[arm]["what"] = (
                    f"{what}; then the student finetune (finetune_student.after_distillation: true, "
                    "the protocol's 'then finetune')"
                )
    steps_res = [
        {
            "arm": k.split("@")[0],
            "steps": int(k.split("@")[1]),
            "test_acc": round(r[k]["test_acc"], 2),
            "distill_acc": round(r[k]["distill_acc"], 2),
            "val_tune_acc": r[k].get("val_tune_acc"),
            "distill_val_tune_acc": r[k].get("distill_val_tune_acc"),
            "seed": s,
        }
        for r, (s, a) in zip(per_task, tasks, strict=True)
        for k in a
        if "@" in k
    ]
    for name in ("A4", "A5"):
        if name in arms_res and steps_curve:
            steps_res.append(
                {
                    "arm": name,
                    "steps": base["distill"]["steps"],
                    "test_acc": arms_res[name]["test_acc"],
                    "distill_acc": arms_res[name].get("distill_acc"),
                    "val_tune_acc": arms_res[name].get("val_tune_acc"),
                    "distill_val_tune_acc": arms_res[name].get("distill_val_tune_acc"),
                    "seeds": arms_res[name]["seeds"],
                }
            )
    steps_res.sort(key=lambda c: (c["arm"], c["steps"]))
    curve_res = [
        {
            "arm": "A5",
            "size": r[k]["transfer_set_size"],
            "test_acc": round(r[k]["test_acc"], 2),
            "distill_acc": round(r[k]["distill_acc"], 2),
            "seed": s,
        }
        for r, (s, a) in zip(per_task, tasks, strict=True)
        for k in a
        if k.startswith("A5:")
    ]
    if "A5" in arms_res:
        a5 = arms_res["A5"]
        curve_res.append(
            {
                "arm": "A5",
                "size": bench["transfer_set_size"],
                "test_acc": a5["test_acc"],
                "distill_acc": a5.get("distill_acc"),
                "seeds": a5["seeds"],
            }
        )
    curve_res.sort(key=lambda c: c["size"])
    merged_from: dict[str, Any] = {}
    default_json = ROOT / (task["result"] + ".json")
    if args.merge and default_json.exists():
        old = json.loads(default_json.read_text())
        for arm, r in old.get("arms", {}).items():
            if arm not in arms_res:
                arms_res[arm] = {
                    **r,
                    "from_run": r.get("from_run")
                    or {
                        "git_commit": old.get("git_commit"),
                        "date": old.get("date"),
                        "distill_steps": ((old.get("config") or {}).get("distill") or {}).get("steps"),
                    },
                }
                merged_from[arm] = arms_res[arm]["from_run"]
        arms_res = {a: arms_res[a] for a in ARMS if a in arms_res}
    result = {
        "labels_per_class": bench["labels_per_class"],
        "teacher": base["teacher"]["model"].replace(str(shared), "../shared"),
        "student": base["student"]["model"],
        "arms": arms_res,
        "transfer_set_size": bench["transfer_set_size"],
        "curve": curve_res,
        "steps_curve": steps_res,
        "merged_arms": merged_from,
        "task": args.task,
        "title": task["title"],
        "unlabeled_target_size": len(splits["unlabeled_target"].read_text().split())
        if "unlabeled_target" in splits
        else 0,
        "eval_split": args.eval_on,
        "eval_images": len(splits[args.eval_on].read_text().split()),
        "seeds": len(seeds),
        "parallel_seed_processes": jobs,
        "quick": args.quick,
        "command": "python bench/quality/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": commit,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "config": json.loads(json.dumps(base).replace(str(shared), "../shared")),
    }
    notes = ROOT / "bench/quality/FINDINGS.md"
    if notes.exists() and not args.quick and args.eval_on == "test":
        result["notes"] = notes.read_text().strip().splitlines()
    result["bars"] = bars(arms_res, args.task)
    default_out = ROOT / (
        task["result"]
        if args.eval_on == "test" and not args.quick
        else f"bench/work/quality-{args.task}-{args.eval_on}-{'quick-' if args.quick else ''}{key}"
    )
    write_results(result, Path(args.out) if args.out else default_out)
    print(Path(str(Path(args.out) if args.out else default_out) + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

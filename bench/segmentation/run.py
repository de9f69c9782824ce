"""Segmentation benchmark (BENCHMARKS.md §5): CamVid, 36 labeled frames, the proxy VFM as teacher.

Arms (same student and steps where they compare; mean ± std over seeds):
  S0 teacher: the proxy VFM's backbone + LR-ASPP head, finetuned on the 36 labeled frames
  S1 student from scratch on the labeled frames (distill + finetune steps of CE)
  S2 task-agnostic: student deep features matched to the frozen pretrained backbone's on the
     generic set (Tiny-ImageNet images), then finetune
  S3 task-oriented per-pixel KT on the generic set, then finetune
  S4 per-pixel KT on the 331 unlabeled CamVid frames, then finetune
  (S5, crop-level retrieval from the generic gallery, is not run yet)

Every distillation arm trains on a teacher-output cache (``kt_train.tasks.segmentation.TeacherMaps``:
``views`` fixed views per image with the teacher's maps at the student's grid, fp16), so the
teacher runs once per stored view, not once per step.

    python bench/segmentation/run.py            # full: 2 seeds in parallel processes (<= 60 min)
    python bench/segmentation/run.py --quick    # 1 seed, short schedules (<= 10 min)

Writes bench/results/segmentation.{json,md,png} (``--quick``: segmentation_quick.*).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench/quality"))

import run as quality  # noqa: E402  (bench/quality/run.py: machine facts, git commit)

from kt_train.data import load_unlabeled  # noqa: E402
from kt_train.tasks.segmentation import (  # noqa: E402
    JointAugment,
    SegmentationDataset,
    SegmentationModel,
    SegmentationRecipe,
    build_segmentation_model,
    build_teacher_maps,
    distill_segmentation,
    evaluate_segmentation,
    fit_segmentation,
    output_grid,
    upsample,
)

log = logging.getLogger("bench.segmentation")

ARMS = ("S0", "S1", "S2", "S3", "S4")
WHAT = {
    "S0": "teacher: proxy VFM backbone + LR-ASPP head, finetuned on the 36 labeled frames",
    "S1": "student from scratch on the labeled frames",
    "S2": "task-agnostic dense feature matching on the generic set (Tiny-ImageNet), then finetune",
    "S3": "task-oriented per-pixel KT on the generic set (Tiny-ImageNet), then finetune",
    "S4": "task-oriented per-pixel KT on the 331 unlabeled CamVid frames, then finetune",
}

CONFIG: dict[str, Any] = {
    "input_size": [180, 240],  # H, W: a quarter of CamVid's 360x480 frames (measured to fit 2 cores)
    "teacher": {
        "model": "timm:mobilenetv2_100@{shared}/models/mobilenetv2_100.tflite_imagenet.safetensors",
        "decoder_channels": 128,
        # decoder alone (backbone frozen), then everything with the backbone at a tenth of the lr;
        # batch norms in eval mode throughout (the proxy's statistics are folded)
        "probe": {"steps": 150, "batch_size": 8, "lr": 3e-3},
        "finetune": {"steps": 200, "batch_size": 8, "lr": 1e-3, "backbone_lr_scale": 0.1, "warmup_steps": 20},
        "augment": {"scale_min": 0.5},
    },
    "student": {"model": "timm:mobilenetv3_small_050", "decoder_channels": 64},
    "distill": {
        "steps": 1000,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup_steps": 50,
        "temperature": 2.0,
        "views": 4,
        "augment": {"scale_min": 0.35},
    },
    "finetune": {
        "steps": 300,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 20,
        "augment": {"scale_min": 0.5},
    },
    "generic_images": 331,  # S2/S3: as many generic images as S4 has unlabeled frames
}
QUICK: dict[str, Any] = {
    "teacher.probe.steps": 60,
    "teacher.finetune.steps": 60,
    "distill.steps": 250,
    "distill.views": 2,
    "finetune.steps": 100,
    "test_limit": 60,
}


def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    d = cfg
    for k in path:
        d = d.setdefault(k, {})
    d[last] = value


class Subset:
    """``n`` seeded images of a larger unlabeled set."""

    def __init__(self, frames: Any, n: int, seed: int):
        self.frames = frames
        self.idx = random.Random(seed).sample(range(len(frames)), min(n, len(frames)))

    def __len__(self) -> int:
        return len(self.idx)

    def load_image(self, i: int) -> Any:
        return self.frames.load_image(self.idx[i])


def _stems(shared: Path, name: str) -> list[str]:
    return [s.strip() for s in (shared / "data/camvid/splits" / name).read_text().splitlines() if s.strip()]


def load_data(shared: Path, test_limit: int | None) -> dict[str, Any]:
    camvid = shared / "data/camvid/camvid.zip"
    meta = json.loads((shared / "data/camvid/classes.json").read_text())
    kw = {"classes": meta["classes"], "void_index": meta["void_index"]}
    test_stems = _stems(shared, "test.txt")
    if test_limit:
        test_stems = test_stems[:test_limit]
    return {
        "labeled": SegmentationDataset(camvid, split="train", stems=_stems(shared, "labeled_36.txt"), **kw),
        "unlabeled": SegmentationDataset(
            camvid, split="train", stems=_stems(shared, "unlabeled_331.txt"), validate=False, **kw
        ),
        "val": SegmentationDataset(camvid, split="val", stems=_stems(shared, "val.txt"), **kw),
        "test": SegmentationDataset(camvid, split="test", stems=test_stems, **kw),
    }


def _recipe(section: dict[str, Any], cfg: dict[str, Any], data: SegmentationDataset, role: str, shared: Path):
    return SegmentationRecipe(
        spec=section["model"].format(shared=shared),
        num_classes=data.num_classes,
        role=role,
        decoder_channels=section["decoder_channels"],
        input_size=tuple(cfg["input_size"]),  # type: ignore[arg-type]
        classes=list(data.classes),
        void_index=data.void_index,
    )


def _eval(model: SegmentationModel, data: dict[str, Any]) -> dict[str, Any]:
    test = evaluate_segmentation(model, data["test"])
    val = evaluate_segmentation(model, data["val"])
    return {
        "test_miou": test["miou"],
        "pixel_acc": test["pixel_acc"],
        "per_class_iou": test["per_class_iou"],
        "val_miou": val["miou"],
    }


def run_seed(
    seed: int, cfg: dict[str, Any], arms: list[str], shared: str, test_limit: int | None
) -> dict[str, Any]:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shared_p = Path(shared)
    data = load_data(shared_p, test_limit)
    size = tuple(cfg["input_size"])
    res: dict[str, Any] = {}
    t0 = time.perf_counter()
    tc = cfg["teacher"]
    teacher = build_segmentation_model(_recipe(tc, cfg, data["labeled"], "teacher", shared_p))
    t_aug = JointAugment(size, **tc["augment"])  # type: ignore[arg-type]
    fit_segmentation(
        teacher,
        data["labeled"],
        augment=t_aug,
        norm_eval=True,
        backbone_lr_scale=0.0,
        seed=seed,
        **tc["probe"],
    )
    for p in teacher.backbone.parameters():
        p.requires_grad_(True)
    fit_segmentation(
        teacher, data["labeled"], augment=t_aug, norm_eval=True, seed=seed + 100, **tc["finetune"]
    )
    t_teacher = time.perf_counter() - t0
    res["S0"] = {**_eval(teacher, data), "wall_s": round(t_teacher, 1)}
    log.info("seed %d S0 %s", seed, {k: v for k, v in res["S0"].items() if k != "per_class_iou"})
    dc, fc, sc = cfg["distill"], cfg["finetune"], cfg["student"]
    d_aug = JointAugment(size, **dc["augment"])  # type: ignore[arg-type]
    f_aug = JointAugment(size, **fc["augment"])  # type: ignore[arg-type]
    s_recipe = _recipe(sc, cfg, data["labeled"], "student", shared_p)
    grid = output_grid(build_segmentation_model(s_recipe), size)  # type: ignore[arg-type]
    generic = None
    if {"S2", "S3"} & set(arms):
        tiny = load_unlabeled(shared_p / "data/gallery/tinyimagenet_50k.zip")
        generic = Subset(tiny, cfg["generic_images"], seed=1234)
    pretrained = None
    if "S2" in arms:
        pretrained = build_segmentation_model(_recipe(tc, cfg, data["labeled"], "teacher", shared_p))
    kw = {"batch_size": dc["batch_size"], "lr": dc["lr"], "warmup_steps": dc["warmup_steps"]}
    for arm in arms:
        if arm == "S0":
            continue
        t1 = time.perf_counter()
        torch.manual_seed(seed)
        student = build_segmentation_model(s_recipe)
        row: dict[str, Any] = {}
        if arm == "S1":
            fit_segmentation(
                student,
                data["labeled"],
                steps=dc["steps"] + fc["steps"],
                batch_size=fc["batch_size"],
                lr=fc["lr"],
                warmup_steps=fc["warmup_steps"],
                augment=f_aug,
                seed=seed,
            )
        else:
            frames = data["unlabeled"] if arm == "S4" else generic
            source = pretrained if arm == "S2" else teacher
            t2 = time.perf_counter()
            maps = build_teacher_maps(
                source,  # type: ignore[arg-type]
                frames,  # type: ignore[arg-type]
                d_aug,
                views=dc["views"],
                grid=grid,  # type: ignore[arg-type]
                seed=seed,
                kind="features" if arm == "S2" else "logits",
            )
            row["cache_build_s"] = round(time.perf_counter() - t2, 1)
            row["cache_mb"] = round(maps.bytes / 2**20, 1)
            t2 = time.perf_counter()
            distill_segmentation(
                student,
                frames,
                maps,
                d_aug,
                steps=dc["steps"],
                temperature=dc["temperature"],
                seed=seed,
                **kw,
            )
            row["distill_s"] = round(time.perf_counter() - t2, 1)
            if arm != "S2":
                after = _eval(student, data)
                row["distill_miou"], row["distill_val_miou"] = after["test_miou"], after["val_miou"]
            fit_segmentation(
                student,
                data["labeled"],
                steps=fc["steps"],
                batch_size=fc["batch_size"],
                lr=fc["lr"],
                warmup_steps=fc["warmup_steps"],
                augment=f_aug,
                seed=seed,
            )
        row.update(_eval(student, data))
        row["wall_s"] = round(time.perf_counter() - t1 + (t_teacher if arm in ("S3", "S4") else 0.0), 1)
        res[arm] = row
        log.info("seed %d %s %s", seed, arm, {k: v for k, v in row.items() if k != "per_class_iou"})
        if arm == "S4":
            res["_picture"] = picture_rows(teacher, student, data["test"], n=3)
    return res


def picture_rows(
    teacher: SegmentationModel, student: SegmentationModel, test: SegmentationDataset, n: int
) -> list:
    """(image, ground truth, teacher, student) as uint8 arrays for the first ``n`` test frames."""
    rows = []
    from kt_train.tasks.segmentation import eval_inputs

    for i in range(min(n, len(test))):
        img, mask = test.load(i)
        x = eval_inputs(img, teacher.recipe.input_size).unsqueeze(0)
        with torch.no_grad():
            t = upsample(teacher(x), mask.shape).argmax(1)[0].numpy().astype(np.uint8)
            s = upsample(student(x), mask.shape).argmax(1)[0].numpy().astype(np.uint8)
        rows.append((np.asarray(img), mask, t, s))
    return rows


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ARMS:
        rows = [r[arm] for r in per_seed if arm in r]
        if not rows:
            continue
        agg: dict[str, Any] = {"seeds": len(rows)}
        for key in ("test_miou", "pixel_acc", "val_miou", "distill_miou", "distill_val_miou"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                agg[key] = round(statistics.fmean(vals), 2)
                agg[f"{key}_std"] = round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0
                agg[f"{key}_per_seed"] = vals
        classes = rows[0]["per_class_iou"].keys()
        agg["per_class_iou"] = {
            c: round(
                statistics.fmean([r["per_class_iou"][c] for r in rows if r["per_class_iou"][c] is not None]),
                2,
            )
            for c in classes
            if any(r["per_class_iou"][c] is not None for r in rows)
        }
        for key in ("wall_s", "cache_build_s", "distill_s", "cache_mb"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                agg[key] = round(statistics.fmean(vals), 1)
        agg["what"] = WHAT[arm]
        out[arm] = agg
    return out


def bars(arms: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    g = {a: r["test_miou"] for a, r in arms.items()}
    out: list[tuple[str, bool | None, str]] = []

    def check(name: str, ok: Any, text: str) -> None:
        out.append((name, bool(ok), text))

    if {"S4", "S1"} <= g.keys():
        check("S4 - S1 >= 8 mIoU", g["S4"] - g["S1"] >= 8, f"{g['S4'] - g['S1']:.2f}")
    if {"S0", "S4"} <= g.keys():
        check("S0 - S4 <= 5", g["S0"] - g["S4"] <= 5, f"{g['S0'] - g['S4']:.2f}")
    if {"S4", "S3"} <= g.keys():
        check("S4 > S3", g["S4"] > g["S3"], f"S4={g['S4']:.2f} S3={g['S3']:.2f}")
    if {"S3", "S2"} <= g.keys():
        check("S3 > S2", g["S3"] > g["S2"], f"S3={g['S3']:.2f} S2={g['S2']:.2f}")
    return out


PALETTE = np.array(
    [
        [128, 128, 128],
        [128, 0, 0],
        [192, 192, 128],
        [128, 64, 128],
        [60, 40, 222],
        [128, 128, 0],
        [192, 128, 128],
        [64, 64, 128],
        [64, 0, 128],
        [64, 64, 0],
        [0, 128, 192],
    ],
    dtype=np.uint8,
)


def colour(mask: np.ndarray, void: int) -> np.ndarray:
    out = np.zeros((*mask.shape, 3), np.uint8)
    ok = mask < len(PALETTE)
    out[ok] = PALETTE[mask[ok]]
    out[mask == void] = 0
    return out


def write_picture(rows: list, void: int, path: Path) -> None:
    from PIL import Image

    tiles = []
    for img, gt, t, s in rows:
        h, w = gt.shape
        pil = Image.fromarray(img).resize((w, h))
        tiles.append(
            np.concatenate([np.asarray(pil), colour(gt, void), colour(t, void), colour(s, void)], axis=1)
        )
    Image.fromarray(np.concatenate(tiles, axis=0)).resize(
        (tiles[0].shape[1] // 2, len(tiles) * tiles[0].shape[0] // 2)
    ).save(path)


def write_md(result: dict[str, Any], path: Path) -> None:
    m = result["machine"]
    lines = [
        "# Segmentation — CamVid, 36 labeled frames",
        "",
        f"`{result['command']}`",
        "",
        f"- date: {result['date']} · commit {result['git_commit']} · wall {result['wall_s'] / 60:.1f} min",
        f"- machine: {m['cpu']} ({m['cores']} threads, {m['device']}); torch {m['torch']}, timm {m['timm']}",
        f"- teacher `{result['teacher']}` + LR-ASPP; student `{result['student']}` + LR-ASPP; input "
        f"{result['config']['input_size'][0]}x{result['config']['input_size'][1]} (H x W), masks scored at 360x480",
        f"- test: {result['test_frames']} frames; seeds {result['seeds']}; mean IoU over the 11 classes, void ignored",
        "",
        "| arm | after distillation (test mIoU) | final test mIoU | pixel acc | val mIoU (distill / final) | wall s | what |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in result["arms"].items():
        d = f"{r['distill_miou']:.2f} ± {r['distill_miou_std']:.2f}" if "distill_miou" in r else "–"
        v = f"{r.get('distill_val_miou', '–')} / {r.get('val_miou', '–')}"
        lines.append(
            f"| {arm} | {d} | {r['test_miou']:.2f} ± {r['test_miou_std']:.2f} | {r['pixel_acc']:.2f} | {v} | "
            f"{r.get('wall_s', 0):.0f} | {r['what']} |"
        )
    lines += ["", "| bar | verdict | value |", "|---|---|---|"]
    for name, ok, text in result["bars"]:
        lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {text} |")
    lines += ["", "Per-class IoU (test, mean over seeds):", ""]
    classes = list(next(iter(result["arms"].values()))["per_class_iou"])
    lines.append("| arm | " + " | ".join(classes) + " |")
    lines.append("|---|" + "---|" * len(classes))
    for arm, r in result["arms"].items():
        lines.append(
            f"| {arm} | "
            + " | ".join(f"{r['per_class_iou'].get(c, float('nan')):.1f}" for c in classes)
            + " |"
        )
    lines += [
        "",
        "Picture (`segmentation.png`): test frames; columns image, ground truth, teacher (S0), student (S4).",
        "",
        "Notes: " + result["notes"],
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="1 seed, short schedules, 60 test frames (<= 10 min)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (json value)"
    )
    ap.add_argument(
        "--out", default=None, help="result path stem (default bench/results/segmentation[_quick])"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = json.loads(json.dumps(CONFIG))
    test_limit = None
    if args.quick:
        for k, v in QUICK.items():
            if k == "test_limit":
                test_limit = v
            else:
                set_key(cfg, k, v)
    for ov in args.set:
        k, v = ov.split("=", 1)
        set_key(cfg, k, json.loads(v))
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    shared = str(Path(args.shared).resolve())
    t0 = time.perf_counter()
    if len(seeds) == 1:
        per_seed = [run_seed(seeds[0], cfg, arms, shared, test_limit)]
    else:
        with mp.get_context("spawn").Pool(len(seeds), maxtasksperchild=1) as pool:
            per_seed = pool.starmap(run_seed, [(s, cfg, arms, shared, test_limit) for s in seeds])
    wall = time.perf_counter() - t0
    pictures = per_seed[0].pop("_picture", None)
    for r in per_seed[1:]:
        r.pop("_picture", None)
    arms_out = aggregate(per_seed)
    stem = (
        Path(args.out)
        if args.out
        else ROOT / "bench/results" / ("segmentation_quick" if args.quick else "segmentation")
    )
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = json.loads((Path(shared) / "data/camvid/classes.json").read_text())
    result = {
        "task": "camvid",
        "labeled_frames": 36,
        "unlabeled_frames": 331,
        "test_frames": test_limit or len(_stems(Path(shared), "test.txt")),
        "teacher": cfg["teacher"]["model"].split("@")[0]
        + "@<shared>/models/mobilenetv2_100.tflite_imagenet.safetensors",
        "student": cfg["student"]["model"],
        "arms": arms_out,
        "per_seed": [
            {a: {k: v for k, v in r.items() if k != "per_class_iou"} for a, r in s.items()} for s in per_seed
        ],
        "seeds": seeds,
        "quick": args.quick,
        "config": cfg,
        "command": "python bench/segmentation/run.py"
        + (" --quick" if args.quick else "")
        + "".join(f" --set {s}" for s in args.set),
        "git_commit": quality.git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall, 1),
        "machine": quality.machine(),
        "notes": (
            "Seeds run in parallel processes, one torch thread each. Each distillation arm builds its "
            "teacher-output cache first (cache_build_s, cache_mb in the json). S1 trains as many steps on the "
            "labeled frames as the KT arms' distillation + finetune together. S5 is not run yet."
        ),
    }
    result["bars"] = bars(arms_out)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_md(result, stem.with_suffix(".md"))
    if pictures:
        write_picture(pictures, int(meta["void_index"]), stem.with_suffix(".png"))
    for name, ok, text in result["bars"]:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {text}")
    for arm, r in arms_out.items():
        print(f"{arm}: test mIoU {r['test_miou']:.2f} ± {r['test_miou_std']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

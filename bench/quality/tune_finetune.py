"""Choose the student-finetune recipe on val_tune (never test): every recipe is applied to the
from-scratch student (A1) and to the distilled students (A3, A4) of one tuning run.

    python bench/quality/tune_finetune.py bench/work/quality/<key>/seed0 steps=200,lr=0.001 steps=500,lr=0.001 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench/quality"))

from run import test_acc  # noqa: E402

from kt_train import pipeline  # noqa: E402
from kt_train.config import DatasetRef, parse_config  # noqa: E402
from kt_train.train import resolve_device  # noqa: E402


def main() -> None:
    seed_dir = Path(sys.argv[1])
    work = seed_dir.parent
    base = json.loads((work / "config.json").read_text())
    splits = work / "splits"
    shared = ROOT.parent / "shared"
    zip_ = str(shared / "data/eurosat/eurosat_rgb.zip")
    train = DatasetRef(path=zip_, split=str(splits / "labeled.txt"))
    val = DatasetRef(path=zip_, split=str(splits / "val_tune.txt"))
    device = resolve_device("auto")
    rows = []
    for variant in sys.argv[2:]:
        fs = dict(base["finetune_student"])
        for kv in variant.split(","):
            k, v = kv.split("=")
            fs[k] = yaml.safe_load(v)
        row = {"variant": variant}
        arms = ("A1",) if "scratch" in variant else ("A3", "A4")
        fs.pop("scratch", None)
        cfg = parse_config({**base, "finetune_student": fs, "data": {"train": train.model_dump()}, "seed": 0})
        for arm in arms:
            inputs = {"classes": None}
            if arm != "A1":
                ck = seed_dir / arm / "distill" / "student.pt"
                if not ck.exists():
                    continue
                inputs = {"student": str(ck)}
            else:
                inputs = {
                    "classes": json.loads((seed_dir / "teacher" / "outputs.json").read_text())["classes"]
                }
            out = work / "ft_tune" / variant.replace(",", "_").replace("=", "") / arm
            f = pipeline.finetune_student(cfg, inputs, out)
            row[arm] = test_acc(f["checkpoint"], val, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (work / "ft_tune" / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

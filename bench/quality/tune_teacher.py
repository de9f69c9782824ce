"""Choose the teacher-finetune recipe on val_tune (never test).

python bench/quality/tune_teacher.py SEED key=value[,key=value...]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench/quality"))

from run import prepare_splits, test_acc  # noqa: E402

from kt_train import pipeline  # noqa: E402
from kt_train.config import DatasetRef, parse_config, set_key  # noqa: E402


def main() -> None:
    seed, variant = int(sys.argv[1]), sys.argv[2]
    shared = ROOT.parent / "shared"
    spec = yaml.safe_load((ROOT / "bench/quality/config.yaml").read_text())
    spec.pop("bench")
    spec["teacher"]["model"] = spec["teacher"]["model"].replace("${shared}", str(shared))
    for kv in variant.split(","):
        k, v = kv.split("=", 1)
        set_key(spec, k, yaml.safe_load(v))
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    work = ROOT / "bench/work/teacher_tune" / key
    splits = prepare_splits(shared, work / "splits", 10, None, seed=0)
    zip_ = str(shared / "data/eurosat/eurosat_rgb.zip")
    spec["data"] = {"train": {"path": zip_, "split": str(splits["labeled"])}}
    spec["seed"] = seed
    cfg = parse_config(spec)
    res = pipeline.finetune_teacher(cfg, {}, work / f"seed{seed}")
    acc = test_acc(
        res["checkpoint"], DatasetRef(path=zip_, split=str(splits["val_tune"])), torch.device("cpu")
    )
    print(
        json.dumps(
            {
                "variant": variant,
                "seed": seed,
                "val_tune": acc,
                "seconds": sum(t["seconds"] for t in res["timings"].values()),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

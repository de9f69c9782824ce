"""Retrieval on real images (BENCHMARKS.md §2a): curate a transfer set for the 100 labeled EuroSAT
images from a 64,400-image gallery that is only ~7% EuroSAT, and measure per selection method the
in-domain precision (share of selected items that are EuroSAT) and the class purity (share of
selected EuroSAT items whose true class is the label of the query that took them).

    python bench/retrieval/real.py            # ~10 min on 2 cores the first time (embeds the gallery)

Gallery = Tiny-ImageNet 50k + CIFAR-10 test 10k + EuroSAT val minus val_tune (4,400), embedded with
the proxy teacher's pooled ImageNet features at 96 px (bench/quality/config.yaml). Curation settings
come from the ``curate:`` section of bench/quality/config.yaml, the same ones arm A5 of the quality
benchmark uses. The finetuned teacher for the teacher filter is the quality benchmark's (seed 0),
trained here if it is not there yet. Results: bench/results/retrieval.{json,md} (merged with the
synthetic-scale results of bench/retrieval/scale.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/quality"))

import run as quality  # noqa: E402  (bench/quality/run.py: config, splits, machine facts)

from kt_train import pipeline  # noqa: E402
from kt_train.config import CurateConfig, DatasetRef  # noqa: E402
from kt_train.curate import curate_transfer_set, write_transfer_report  # noqa: E402
from kt_train.embed import Encoder, raw_forward_throughput  # noqa: E402
from kt_train.gallery import Gallery, build_gallery  # noqa: E402
from kt_train.models import load_checkpoint  # noqa: E402

log = logging.getLogger("bench.retrieval")
METHODS = ("query_balanced", "knn", "class_balanced", "random")


def load_base(shared: Path, config: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The quality benchmark's config (the default recipe + the task), teacher sizes resolved."""
    base, bench = quality.load_spec(config, shared)
    base["teacher"]["image_size"], base["student"]["image_size"] = quality.resolved_sizes(
        base, shared / "data/eurosat/eurosat_rgb.zip"
    )
    return base, bench


def gallery_sources(shared: Path, work: Path) -> list[Any]:
    """The A5 gallery: Tiny-ImageNet 50k + CIFAR-10 test + the 4,400 EuroSAT images of
    ``splits/val_gallery.txt`` (val minus val_tune; every class present, labels never used)."""
    return [
        str(shared / "data/gallery/tinyimagenet_50k.zip"),
        str(shared / "data/gallery/cifar10_test.zip"),
        (str(shared / "data/eurosat/eurosat_rgb.zip"), str(shared / "data/eurosat/splits/val_gallery.txt")),
    ]


def ensure_gallery(
    shared: Path, base: dict[str, Any], work: Path, batch_size: int = 256, sources: list[Any] | None = None
) -> tuple[Gallery, float]:
    """Build (or resume / reuse) the gallery (default: the A5 gallery of ``gallery_sources``);
    returns it and the build's images/s (0 if reused)."""
    t0 = time.perf_counter()
    done_before = (work / "gallery" / "gallery.json").exists()
    g = build_gallery(
        sources or gallery_sources(shared, work),
        work / "gallery",
        encoder=base["teacher"]["model"],
        image_size=quality.resolved_sizes(base, shared / "data/eurosat/eurosat_rgb.zip")[0],
        name="eurosat-a5",
        batch_size=batch_size,
        shard_size=20_000,
    )
    rate = 0.0 if done_before else g.count / (time.perf_counter() - t0)
    if not g.doc.get("index"):
        g.build_index()
    return g, rate


def teacher_checkpoint(shared: Path, base: dict[str, Any], bench: dict[str, Any], seed: int = 0) -> str:
    """The quality benchmark's finetuned teacher for this seed (trained here when missing)."""
    import hashlib

    key = hashlib.sha1(json.dumps(base, sort_keys=True).encode()).hexdigest()[:10]
    work = ROOT / "bench/work/quality" / key
    splits = quality.prepare_splits(shared, work / "splits", bench["labels_per_class"], None, seed=0)
    zip_ = str(shared / "data/eurosat/eurosat_rgb.zip")
    cfg = quality.arm_config(
        {**base, "seed": seed}, work, train=DatasetRef(path=zip_, split=str(splits["labeled"])), val=None
    )
    return pipeline.finetune_teacher(cfg, {}, work / f"seed{seed}" / "teacher")["checkpoint"]


def score(rows: list[dict[str, Any]], eurosat_zip: str) -> dict[str, Any]:
    in_domain = [r for r in rows if Path(r["source"]).name == Path(eurosat_zip).name]
    pure = [r for r in in_domain if r["key"].split("/")[0] == r["query_label"]]
    classes = sorted({r["key"].split("/")[0] for r in in_domain})
    return {
        "size": len(rows),
        "in_domain_precision": round(100.0 * len(in_domain) / max(len(rows), 1), 2),
        "class_purity": round(100.0 * len(pure) / len(in_domain), 2) if in_domain else None,
        "in_domain_items": len(in_domain),
        "eurosat_classes_found": len(classes),
    }


def embed_vs_raw(shared: Path, base: dict[str, Any], work: Path, n: int, batch_size: int) -> dict[str, float]:
    """Embed pipeline (read + decode + resize + forward + write) vs the encoder's raw forward, on
    the same machine in the same run."""
    import zipfile

    with zipfile.ZipFile(shared / "data/gallery/tinyimagenet_50k.zip") as zf:
        keys = sorted(i.filename for i in zf.infolist() if not i.is_dir())[:n]
    split = work / "embed_subset.txt"
    split.write_text("\n".join(keys) + "\n")
    enc = Encoder.from_spec(base["teacher"]["model"], image_size=base["teacher"]["image_size"])
    raw = raw_forward_throughput(enc, n=min(n, 2048), batch_size=batch_size)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        t0 = time.perf_counter()
        build_gallery(
            [(str(shared / "data/gallery/tinyimagenet_50k.zip"), str(split))],
            Path(tmp) / "g",
            encoder=enc,
            batch_size=batch_size,
            shard_size=n,
            index_kind="flat",
        )
        pipe = n / (time.perf_counter() - t0)
    raw2 = raw_forward_throughput(enc, n=min(n, 2048), batch_size=batch_size)
    return {"embed_img_s": round(pipe, 1), "raw_forward_img_s": round((raw + raw2) / 2, 1), "embed_subset": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--config", default=str(ROOT / "bench/quality/config.yaml"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--size", type=int, default=None, help="transfer-set size (default: the quality benchmark's)"
    )
    ap.add_argument(
        "--embed-subset", type=int, default=5000, help="images for the embed-vs-raw throughput check"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a curate key")
    ap.add_argument("--out", default=str(ROOT / "bench/results/retrieval"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kt_train.train").setLevel(logging.WARNING)
    shared = Path(args.shared).resolve()
    base, bench = load_base(shared, Path(args.config))
    work = ROOT / "bench/work/retrieval"
    work.mkdir(parents=True, exist_ok=True)
    commit = quality.git_commit()
    t_start = time.perf_counter()

    gallery, build_rate = ensure_gallery(shared, base, work)
    log.info("gallery %s: %d items (%s)", gallery.name, gallery.count, gallery.encoder.get("spec"))
    thr = embed_vs_raw(shared, base, work, args.embed_subset, 256)
    log.info("embed %.1f img/s vs raw forward %.1f img/s", thr["embed_img_s"], thr["raw_forward_img_s"])

    curate_cfg = copy.deepcopy(base.get("curate", {}))
    curate_cfg.pop("gallery", None)
    for ov in args.set:
        k, v = ov.split("=", 1)
        curate_cfg[k.removeprefix("curate.")] = yaml.safe_load(v)
    size = args.size or 4000  # BENCHMARKS.md §2's calibration size; A5's size is a row of its own
    zip_ = str(shared / "data/eurosat/eurosat_rgb.zip")
    labeled_split = shared / f"data/eurosat/splits/labeled_{bench['labels_per_class']}_per_class.txt"
    labeled = pipeline.open_labeled(DatasetRef(path=zip_, split=str(labeled_split)), what="train")
    teacher, tclasses = None, None
    if curate_cfg.get("teacher_filter") or curate_cfg.get("teacher_rerank"):
        ckpt_path = teacher_checkpoint(shared, base, bench)
        teacher, meta = load_checkpoint(ckpt_path)
        tclasses = list(meta["classes"])
    encoder = Encoder.from_spec(base["teacher"]["model"], image_size=base["teacher"]["image_size"])

    variants: dict[str, dict[str, Any]] = {}
    methods_wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    plain = {**curate_cfg, "teacher_filter": False, "teacher_rerank": 0.0}
    plan: list[tuple[str, dict[str, Any], list[str]]] = [
        ("gallery features only", plain, methods_wanted),
        ("features + teacher (the config)", curate_cfg, [m for m in methods_wanted if m != "random"]),
        (
            f"the config, size {bench['transfer_set_size']} (A5's)",
            {**curate_cfg, "size": bench["transfer_set_size"]},
            ["query_balanced"],
        ),
        ("the config + 4 query crops", {**curate_cfg, "crops": 4}, ["query_balanced"]),
    ]
    for variant, vcfg, methods_here in plan:
        variants[variant] = {}
        for method in methods_here:
            cfg = CurateConfig(**{"size": size, **vcfg, "method": method})
            t0 = time.perf_counter()
            ts = curate_transfer_set(
                gallery, labeled, cfg, encoder=encoder, teacher=teacher, teacher_classes=tclasses
            )
            res = {**score(ts.rows, zip_), "curate_s": round(time.perf_counter() - t0, 1)}
            for k in ("duplicates_dropped", "leakage_dropped", "teacher_filter_dropped", "candidates"):
                res[k] = ts.summary.get(k)
            res["timings"] = ts.summary["timings"]
            variants[variant][method] = res
            log.info("%s %s %s", variant, method, res)
            if method == "query_balanced" and variant.startswith("features + teacher"):
                out = work / "curated"
                ts.write(out)
                write_transfer_report(
                    ts, out / "report.html", gallery, labeled, f"{variant}: {cfg.size} items"
                )
    headline = "features + teacher (the config)"
    methods = dict(variants[headline])
    methods["random"] = variants["gallery features only"].get("random", {})
    real = {
        "methods": methods,
        "variants": variants,
        "headline_variant": headline,
        "curate_config": {**curate_cfg, "size": size},
        "gallery": {"count": gallery.count, "in_domain": 4400, "encoder": gallery.encoder},
        "gallery_build_img_s": round(build_rate, 1) if build_rate else None,
        **thr,
        "embed_vs_raw": round(thr["embed_img_s"] / thr["raw_forward_img_s"], 3),
    }
    out = Path(args.out)
    result: dict[str, Any] = (
        json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    )
    scale_path = ROOT / "bench/results/retrieval_scale.json"
    if scale_path.exists():
        result["scale"] = json.loads(scale_path.read_text()).get("scale", result.get("scale"))
    result["real"] = real
    result.update(
        {
            "command": "python bench/retrieval/real.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "git_commit": commit,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s_real": round(time.perf_counter() - t_start, 1),
            "machine": quality.machine(),
        }
    )
    write_results(result, out)
    print(out.with_suffix(".md").read_text())
    return 0


def write_results(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = ["# Retrieval benchmark (BENCHMARKS.md §2)", ""]
    m = result.get("machine", {})
    lines += [
        f"- date: {result.get('date')}; commit `{result.get('git_commit')}`",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; torch {m.get('torch')}, faiss {m.get('faiss', '?')}",
        f"- command: `{result.get('command')}`",
        "",
    ]
    real = result.get("real")
    if real:
        g = real["gallery"]
        lines += [
            "## (a) Real gallery",
            "",
            f"Gallery: {g['count']:,} images (Tiny-ImageNet 50,000 + CIFAR-10 test 10,000 + EuroSAT val minus "
            f"val_tune {g['in_domain']:,}), encoder `{(g['encoder'] or {}).get('spec')}` at "
            f"{(g['encoder'] or {}).get('image_size')} px. Queries: the 100 labeled EuroSAT images. "
            f"Curation config: `{json.dumps(real['curate_config'])}`.",
            "",
            "| variant | method | in-domain precision % | class purity % | EuroSAT items | dup. dropped | curate s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for variant, methods in real["variants"].items():
            for method, r in methods.items():
                lines.append(
                    f"| {variant} | {method} | {r['in_domain_precision']} | {r['class_purity']} | "
                    f"{r['in_domain_items']} | {r['duplicates_dropped']} | {r['curate_s']} |"
                )
        lines += [
            "",
            f"Headline (the `methods` of retrieval.json): **{real['headline_variant']}**.",
            f"Embed pipeline {real['embed_img_s']} img/s vs raw forward {real['raw_forward_img_s']} img/s "
            f"= {100 * real['embed_vs_raw']:.0f}% (subset of {real['embed_subset']:,} images, same run).",
            "",
        ]
    scale = result.get("scale")
    if scale:
        lines += [
            "## (b) Synthetic scale (bench/retrieval/scale.py; see retrieval_scale.md for its command and machine)",
            "",
            "| n | index | build s | bytes/vector | curate s | exact s | speedup | recall@50 |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in scale.items():
            lines.append(
                f"| {n} | {r.get('index')} | {r.get('build_s')} | {r.get('bytes_per_vector')} | {r.get('curate_s')} | "
                f"{r.get('exact_s')} | {r.get('speedup_vs_exact')} | {r.get('recall_at_50')} |"
            )
        lines.append("")
    notes = ROOT / "bench/retrieval/FINDINGS.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    out.with_suffix(".md").write_text("\n".join(lines))


def render(out: Path = ROOT / "bench/results/retrieval") -> None:
    """Re-render retrieval.md from retrieval.json, merging the latest synthetic-scale results."""
    result = json.loads(out.with_suffix(".json").read_text())
    scale_path = ROOT / "bench/results/retrieval_scale.json"
    if scale_path.exists():
        result["scale"] = json.loads(scale_path.read_text()).get("scale", result.get("scale"))
    write_results(result, out)


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``kt`` command line: ``kt train -c config.yaml``, ``kt config``, ``kt predict``.

(``kt demo`` is in ``kt_client.cli``: the demo runs the service, which this library does not import.)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .config import STAGES, TrainConfig, describe_keys, dump_config, load_config
from .errors import KTError

console = Console(stderr=True)


def _key_reference() -> str:
    # "\b" stops click from re-wrapping the paragraph that follows.
    lines = ["\b", "Config keys (YAML; any can be overridden with --set key.sub=value):"]
    for key, default, desc in describe_keys():
        lines.append(f"  {key}" + (f" = {default}" if default else ""))
        if desc:
            lines.append(f"      {desc}")
    return "\n".join(lines)


app = typer.Typer(
    name="kt",
    help="Task-oriented knowledge transfer: finetune a foundation-model teacher on a few labels, "
    "distill it into a small student on a transfer set, finetune, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class RichReporter:
    """Progress bars for the training loops."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def start(self, task: str, total: int) -> None:
        self.tasks[task] = self.progress.add_task(task, total=total, metrics="")

    def update(self, task: str, step: int, metrics: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
        self.progress.update(self.tasks[task], completed=step, metrics=text)

    def finish(self, task: str) -> None:
        self.progress.update(self.tasks[task], completed=self.progress.tasks[self.tasks[task]].total)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=False,
    )


ProgressIntervalOpt = Annotated[
    float | None,
    typer.Option(
        "--progress-interval",
        min=0.0,
        help="seconds between progress lines when stderr is not a terminal (logs, CI, nohup), "
        "where the progress bars would stay silent (default: KT_PROGRESS_INTERVAL, else 30)",
    ),
]


def _line_reporter(phases: list[Any], interval_s: float | None) -> Any:
    """Periodic progress lines on the console's stream (``kt_train.progress.LineReporter``); the
    rate is sampled at least four times per line (and at most every second)."""
    from .progress import LineReporter, ProgressTracker, progress_interval

    every = progress_interval(interval_s)
    tracker = ProgressTracker(phases, min_sample_s=min(1.0, every / 4))
    return LineReporter(tracker, stream=console.file, interval_s=every)


def _summary(results: dict[str, dict[str, Any]], out_dir: Path) -> Table:
    table = Table(title=f"kt train — {out_dir}", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for stage, res in results.items():
        bits = []
        for k, v in (res.get("metrics") or {}).items() if isinstance(res.get("metrics"), dict) else []:
            bits.append(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}")
        for k in ("student_top1", "teacher_top1"):
            if k in res:
                bits.append(f"{k.replace('_top1', '')} top-1 {res[k]:.2f}%")
        for k in ("checkpoint", "safetensors", "onnx"):
            if k in res:
                path = Path(res[k])
                bits.append(f"{k}: {path.relative_to(out_dir) if path.is_relative_to(out_dir) else path}")
        for fmt, reason in (res.get("failed_formats") or {}).items():
            hint = f"{reason} (export it again: kt train --stages export --set export.formats=[{fmt}])"
            bits.append(f"[yellow]{escape(fmt)} left out[/]: {escape(hint)}")
        table.add_row(stage, f"{res.get('seconds', 0):.1f}", "\n".join(bits))
    return table


def _fail(e: Exception) -> None:
    # Messages quote specs like 'timm:<name>[@tag|path]': print them as text, not as rich markup.
    console.print(f"[bold red]error:[/] {escape(str(e))}")
    raise typer.Exit(2)


@app.command(epilog=_key_reference(), context_settings={"max_content_width": 200})
def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config file (see the keys below)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override: key.sub=value (YAML value)")
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out-dir", "-o", help="output directory (= out_dir)")
    ] = None,
    stages: Annotated[
        str | None, typer.Option(help=f"comma-separated subset of: {', '.join(STAGES)}")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch intra-op threads (default: KT_THREADS, else one per usable core); "
            "give each of N concurrent runs cores/N",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    progress_interval: ProgressIntervalOpt = None,
) -> None:
    """Run the pipeline stages of a config: finetune_teacher, distill, finetune_student, evaluate, export.

    Each stage writes into <out_dir>/<stage>/ and is skipped when it finished before; an interrupted
    training stage resumes from its last.ckpt. Stages run alone take the outputs of the earlier stages
    a previous run finished: --stages export --set export.formats=[onnx] adds a format to the export.
    The resolved config is saved as <out_dir>/config.yaml. On a terminal each loop has a progress bar;
    elsewhere (a log file, CI, nohup) a line like `distill: step 1200/4000 (30%), 410 img/s, ETA 6m48s;
    run 45%, ETA 12m03s` is printed every --progress-interval seconds.
    """
    from .costs import measure_model_costs
    from .pipeline import run_pipeline
    from .progress import plan_phases
    from .threads import configure_threads

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    configure_threads(threads)
    overrides = list(set_ or [])
    if out_dir:
        overrides.append(f"out_dir={out_dir}")
    if stages:
        overrides.append(f"stages=[{stages}]")
    try:
        cfg = load_config(config, overrides)
        if console.is_terminal:
            with _progress() as progress:
                results = run_pipeline(cfg, reporter=RichReporter(progress))
        else:
            phases = plan_phases(cfg, model_costs=measure_model_costs(cfg))
            results = run_pipeline(cfg, reporter=_line_reporter(phases, progress_interval))
    except KTError as e:
        _fail(e)
    console.print(_summary(results, Path(cfg.out_dir)))
    console.print(f"resolved config: {Path(cfg.out_dir) / 'config.yaml'}")


@app.command("tune-batch")
def tune_batch(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config file")],
    teacher: Annotated[Path, typer.Option(help="finetuned teacher checkpoint (finetune_teacher/teacher.pt)")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="override: key.sub=value")] = None,
    limit: Annotated[int, typer.Option(help="largest batch size tried")] = 4096,
) -> None:
    """Find the largest distillation batch that fits on the config's device (doubling from 16).

    On CPU memory is rarely the limit; the number is an upper bound, not a recommendation.
    """
    from .pipeline import max_distill_batch

    try:
        cfg = load_config(config, list(set_ or []))
        bs = max_distill_batch(cfg, teacher, limit=limit)
    except KTError as e:
        _fail(e)
    typer.echo(f"largest distillation batch that fits: {bs} (distill.batch_size; lr usually scales with it)")


@app.command("config")
def show_config(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="validate and print this config resolved")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s")] = None,
) -> None:
    """Print a complete config (defaults, or a file resolved and validated) as YAML."""
    try:
        cfg = load_config(config, list(set_ or [])) if config or set_ else TrainConfig()
    except KTError as e:
        _fail(e)
    sys.stdout.write(dump_config(cfg))


@app.command()
def predict(
    model: Annotated[
        Path, typer.Argument(help="exported model: model.onnx, model.safetensors or model.torchscript.pt")
    ],
    images: Annotated[
        list[str], typer.Argument(help="image files, folders (searched recursively), .zip or .tar archives")
    ],
    format: Annotated[
        str | None,
        typer.Option("--format", "-f", help="onnx, safetensors or torchscript (default: from the name)"),
    ] = None,
    card: Annotated[
        Path | None,
        typer.Option(
            help="model card JSON (default: <model stem>.model_card.json, as `kt models download` writes it, "
            "or model_card.json beside the model; "
            "`kt models show ID --json` output works too)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the predictions as JSON")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write the predictions to a .csv or .jsonl file")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="classes listed per image")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: all)")] = None,
) -> None:
    """Predict the class of images (or, for a segmentation model, write one mask PNG per image into
    --out, default ./masks) with a downloaded model, preprocessed exactly as its card says.

    The card's preprocessing is what the evaluate stage used for the card's test metrics, so the
    predictions are the ones those metrics counted.
    """
    import json

    from .predict import find_card, is_segmentation_card, predict_files, predict_masks, write_predictions

    try:
        if is_segmentation_card(find_card(model, card)):
            # a segmentation model: one index mask PNG per image, into --out (a directory)
            masks = predict_masks(model, card, images, out or Path("masks"), format=format, threads=threads)
            if as_json:
                sys.stdout.write(json.dumps([m.to_dict() for m in masks], indent=2) + "\n")
            else:
                console.print(
                    f"{len(masks)} masks in {out or Path('masks')} (class indices; the card's palette colours them)"
                )
            return
        preds = predict_files(
            model, card, images, format=format, top_k=top_k, batch_size=batch_size, threads=threads
        )
        if out is not None:
            write_predictions(preds, out)
    except KTError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps([p.to_dict() for p in preds], indent=2) + "\n")
    elif out is None:
        table = Table(title=f"kt predict — {model}", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("label")
        table.add_column("prob", justify="right")
        table.add_column(f"top {top_k}", overflow="fold")
        for p in preds:
            rest = ", ".join(f"{c} {q:.3f}" for c, q in p.top_k[1:])
            table.add_row(escape(p.path), escape(p.label), f"{p.prob:.3f}", escape(rest))
        Console().print(table)
    if out is not None:
        console.print(f"{len(preds)} predictions in {out}")


gallery_app = typer.Typer(
    help="Galleries: embedded image collections (+ FAISS index) that transfer sets are retrieved from.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(gallery_app, name="gallery")


def _gallery_progress(progress: Progress, what: str, unit: str = "image") -> Any:
    """A bar of ``unit``s (images, or a ``--workers N`` build's shards, which reports no rate)."""
    task: dict[str, TaskID] = {}
    label = what if unit == "image" else f"{what} ({unit}s)"

    def update(done: int, total: int, rate: float) -> None:
        if "t" not in task:
            task["t"] = progress.add_task(label, total=total, metrics="")
        metrics = f"{rate:.0f} img/s" if unit == "image" else ""
        progress.update(task["t"], completed=done, total=total, metrics=metrics)

    return update


@gallery_app.command("build")
def gallery_build(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="image folder, .zip, webdataset .tar shard(s) (a directory or name-{00000..00009}.tar); "
            "SOURCE::SPLIT keeps only the entries listed in the SPLIT file"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="gallery directory to write (or resume)")],
    encoder: Annotated[
        str | None, typer.Option(help="model spec of the encoder (default: an open_clip image tower)")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="encoder input side in pixels")] = None,
    name: Annotated[str | None, typer.Option(help="gallery name (default: the directory name)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 128,
    shard_size: Annotated[
        int, typer.Option(help="images per shard (built and resumed independently)")
    ] = 50_000,
    index: Annotated[str, typer.Option(help="auto, flat, hnsw, ivf_flat or ivf_pq")] = "auto",
    memory_gb: Annotated[float | None, typer.Option(help="memory budget of the index in GB")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a gallery built from other sources")] = False,
    num_workers: Annotated[
        int, typer.Option(help="image-decoding worker processes (of each shard process with --workers N)")
    ] = 0,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda when present)")
    ] = None,
    progress_interval: ProgressIntervalOpt = None,
    workers: Annotated[
        int,
        typer.Option(
            help="N > 1: train the IVF quantizer once, embed and index the shards in N processes, merge "
            "them into one on-disk index (kt_train.gallery_shards; the service runs the same steps as a "
            "Celery canvas)"
        ),
    ] = 1,
) -> None:
    """Embed images into a gallery (resumable: finished shards are kept), then index it.

    On a terminal the embedding has a progress bar; elsewhere (a log file, CI, nohup) a line like
    `embed: image 12000/50000 (24%), 410 img/s, ETA 1m33s` is printed every --progress-interval seconds.
    """
    from .gallery import DEFAULT_ENCODER, build_gallery
    from .progress import EMBED, Phase

    parsed: list[Any] = []
    for s in sources:
        src, sep, split = s.partition("::")
        parsed.append((src, split) if sep else src)

    def build(progress: Any) -> Any:
        common: dict[str, Any] = {
            "encoder": encoder or DEFAULT_ENCODER,
            "image_size": image_size,
            "name": name,
            "batch_size": batch_size,
            "shard_size": shard_size,
            "index_kind": index,
            "memory_budget_bytes": int(memory_gb * 2**30) if memory_gb else None,
            "overwrite": overwrite,
            "num_workers": num_workers,
            "device": device,
        }
        if workers > 1:
            from .gallery_shards import build_gallery_parallel

            return build_gallery_parallel(
                parsed,
                out,
                workers=workers,
                progress=lambda done, total: progress(done, total, 0.0),  # shards, not images
                **common,
            )
        return build_gallery(parsed, out, progress=progress, **common)

    unit = "shard" if workers > 1 else "image"  # build_gallery_parallel counts shards
    try:
        if console.is_terminal:
            with _progress() as bars:
                g = build(_gallery_progress(bars, EMBED, unit))
        else:
            lines = _line_reporter([Phase(EMBED, 1, unit=unit, group=EMBED)], progress_interval)
            g = build(lambda done, total, _rate: lines.report(EMBED, done, total))
    except KTError as e:
        _fail(e)
    console.print(f"gallery {g.name}: {g.count} images, {g.dim}-d, in {g.path}")


@gallery_app.command("import")
def gallery_import(
    embeddings: Annotated[Path, typer.Option(help="directory of img_emb_*.npy (clip-retrieval layout)")],
    metadata: Annotated[Path, typer.Option(help="directory of metadata_*.parquet, same row order")],
    out: Annotated[Path, typer.Option("--out", "-o", help="gallery directory to write")],
    encoder: Annotated[
        str | None, typer.Option(help="model spec that made the embeddings (needed to curate)")
    ] = None,
    index: Annotated[str, typer.Option(help="auto, flat, hnsw, ivf_flat or ivf_pq")] = "auto",
    memory_gb: Annotated[float | None, typer.Option(help="memory budget of the index in GB")] = None,
    image_root: Annotated[
        str | None, typer.Option(help="where relative image paths of the metadata are found")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing gallery in --out")] = False,
) -> None:
    """Bring precomputed embeddings + parquet metadata (e.g. a LAION index) without re-embedding."""
    from .gallery import import_embeddings

    try:
        g = import_embeddings(
            embeddings,
            metadata,
            out,
            encoder_spec=encoder,
            image_root=image_root,
            overwrite=overwrite,
            index_kind=index,
            memory_budget_bytes=int(memory_gb * 2**30) if memory_gb else None,
        )
    except KTError as e:
        _fail(e)
    console.print(f"gallery {g.name}: {g.count} vectors, {g.dim}-d, in {g.path}")


@gallery_app.command("info")
def gallery_info(path: Annotated[Path, typer.Argument(help="gallery directory")]) -> None:
    """Print a gallery's description (gallery.json)."""
    import json

    from .gallery import Gallery

    try:
        g = Gallery.open(path)
    except KTError as e:
        _fail(e)
    sys.stdout.write(json.dumps(json.loads((g.path / "gallery.json").read_text()), indent=2) + "\n")


@app.command()
def curate(
    gallery: Annotated[Path, typer.Option(help="gallery directory (kt gallery build)")],
    labeled: Annotated[
        str, typer.Option(help="the labeled images: ImageFolder dir or .zip, or a path,label manifest")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    split: Annotated[
        str | None, typer.Option(help="keep only the labeled entries listed in this file")
    ] = None,
    size: Annotated[int, typer.Option(help="items in the transfer set")] = 5000,
    method: Annotated[
        str, typer.Option(help="query_balanced, knn, class_balanced or random")
    ] = "query_balanced",
    guard: Annotated[
        list[str] | None,
        typer.Option(help="evaluation images whose near-duplicates are excluded (repeatable)"),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(help="finetuned teacher checkpoint: keep items it assigns to the query's class"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config with a curate: section")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override: curate.key=value (see kt train --help)")
    ] = None,
) -> None:
    """Curate a transfer set: query-balanced crop retrieval of gallery images for the labeled images.

    Writes manifest.{jsonl,csv,parquet} (what 'kt train' takes as data.transfer), report.html
    (open it in a browser) and summary.json into --out.
    """
    from .pipeline import curate as curate_stage

    overrides = [
        f"curate.gallery={gallery}",
        f"curate.size={size}",
        f"curate.method={method}",
        f"data.train.path={labeled}",
        f"out_dir={out}",
        *(set_ or []),
    ]
    if split:
        overrides.append(f"data.train.split={split}")
    if teacher:
        overrides.append("curate.teacher_filter=true")
    try:
        cfg = load_config(config, overrides)
        inputs: dict[str, Any] = {"guard": list(guard or [])}
        if teacher:
            inputs["teacher"] = str(teacher)
        with console.status("curating ..."):
            res = curate_stage(cfg, inputs, out)
    except KTError as e:
        _fail(e)
    summary = res.get("summary", {})
    table = Table(title=f"kt curate — {out}", title_justify="left")
    table.add_column("class")
    table.add_column("items", justify="right")
    for cls, n in sorted((summary.get("per_class") or {}).items()):
        table.add_row(escape(str(cls)), str(n))
    console.print(table)
    console.print(
        f"{res.get('size')} items ({summary.get('duplicates_dropped', 0)} near-duplicates and "
        f"{summary.get('leakage_dropped', 0)} leaks dropped) in {summary.get('seconds', 0):.1f} s"
    )
    for k in ("manifest", "report"):
        if k in res:
            console.print(f"{k}: {res[k]}")


if __name__ == "__main__":  # pragma: no cover
    app()

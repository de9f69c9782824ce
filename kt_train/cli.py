"""The ``kt`` command line: ``kt train -c config.yaml``, ``kt config``, ``kt demo``."""

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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the pipeline stages of a config: finetune_teacher, distill, finetune_student, export, evaluate.

    Each stage writes into <out_dir>/<stage>/ and is skipped when it finished before; an interrupted
    training stage resumes from its last.ckpt. The resolved config is saved as <out_dir>/config.yaml.
    """
    from .pipeline import run_pipeline

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    overrides = list(set_ or [])
    if out_dir:
        overrides.append(f"out_dir={out_dir}")
    if stages:
        overrides.append(f"stages=[{stages}]")
    try:
        cfg = load_config(config, overrides)
        with _progress() as progress:
            results = run_pipeline(cfg, reporter=RichReporter(progress))
    except KTError as e:
        _fail(e)
    console.print(_summary(results, Path(cfg.out_dir)))
    console.print(f"resolved config: {Path(cfg.out_dir) / 'config.yaml'}")


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
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="where the data and the run go")] = Path(
        "runs/demo"
    ),
    teacher: Annotated[str, typer.Option(help="teacher model spec")] = "timm:test_vit",
    student: Annotated[str, typer.Option(help="student model spec")] = "timm:mobilenetv3_small_050",
) -> None:
    """Generate a small synthetic labeled task offline and run the whole pipeline on it."""
    import yaml

    from .demo import make_demo_data

    paths = make_demo_data(out_dir / "data", per_class=10, test_per_class=25, unlabeled=600)
    cfg = {
        "out_dir": str(out_dir / "run"),
        "teacher": {"model": teacher, "image_size": 32},
        "student": {"model": student, "image_size": 32},
        "data": {k: {"path": str(v)} for k, v in paths.items()},
        "finetune_teacher": {
            "linear_probe": {"steps": 60, "batch_size": 32, "lr": 0.01, "weight_decay": 0.0},
            "full_finetune": {"steps": 60, "batch_size": 32, "lr": 0.001, "warmup_steps": 5},
            "layer_decay": 0.75,
        },
        "distill": {"steps": 150, "batch_size": 32, "lr": 0.003, "warmup_steps": 10},
        "finetune_student": {"steps": 60, "batch_size": 32, "lr": 0.001},
    }
    path = out_dir / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    console.print(f"demo data in {out_dir / 'data'}; config {path}")
    train(config=path, set_=None, out_dir=None, stages=None, verbose=False)


if __name__ == "__main__":  # pragma: no cover
    app()

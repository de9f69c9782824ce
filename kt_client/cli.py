"""``kt``: one command for the library and the service.

- library (``kt_train.cli``): ``kt train``, ``kt config``, ``kt predict``, ``kt gallery …``, ``kt curate``
- service: ``kt serve`` (API + worker on the embedded default, or KT_* settings), ``kt admin …``,
  ``kt demo`` (``service.demo``, what ``bash .ci/demo`` runs)
- local data preparation: ``kt datasets split`` (``kt_train.splits``: train/test/rest zips, no server)
- client of a running service (``kt_client.remote``): ``kt login``, ``kt logout``, ``kt datasets …``,
  ``kt transfer-sets …``, ``kt jobs …``, ``kt models …``, ``kt galleries …``

``kt_train`` has no web, queue or database imports, and ``service`` never imports torch; this module
is where the two meet, so it is the console script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kt_client.remote import EXIT_CODES_HELP, EXIT_USAGE, add_remote_commands, datasets_app
from kt_train.cli import app as train_app

app = typer.Typer(
    name="kt",
    help=(train_app.info.help or "")
    + " Service: `kt serve` runs the API and a worker; `kt admin` manages keys and galleries."
    + " Client: `kt login`, then `kt datasets`, `kt transfer-sets`, `kt jobs`, `kt models` talk to it.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.registered_commands += train_app.registered_commands
app.registered_groups += train_app.registered_groups
assert train_app.registered_callback is None, "kt_train.cli's callback would be lost: merge it here"


def version() -> str:
    """The installed package's version (the source tree's ``kt_train.__version__`` when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vfm-kt")
    except PackageNotFoundError:
        import kt_train

        return kt_train.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kt (vfm-kt) {version()}")
        raise typer.Exit(0)


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """(The options of `kt` itself; the commands' options follow them.)"""


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="Start the service: the HTTP API and Celery worker processes (`kt serve --help` for options).",
)
def serve(ctx: typer.Context) -> None:
    import os

    from service.serve import main
    from service.storage import PRIVATE_UMASK

    # before the database, the logs and the workers are made: every tenant's data stays this user's
    os.umask(PRIVATE_UMASK)
    raise typer.Exit(main(list(ctx.args), prog="kt serve"))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    help="The offline demo (what `bash .ci/demo` runs): a tiny stand-in VFM pretrained and registered, a "
    "4-class task with 10 labels per class, the service started, a transfer set curated, then a distilled "
    "and a scratch student trained and compared on the test set (`kt demo --help` for options).",
)
def demo(ctx: typer.Context) -> None:
    from service.demo import main

    raise typer.Exit(main(list(ctx.args)))


def _admin() -> typer.Typer:
    from service.admin import cli

    return cli


app.add_typer(_admin(), name="admin", help="Service administration: API keys, galleries.")


@datasets_app.command("split")
def datasets_split(
    src: Annotated[
        Path,
        typer.Argument(
            help="A folder of class folders of images, or a .zip of one (one top folder above the class "
            "folders, as in EuroSAT_RGB.zip, is fine)."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("-o", "--out-dir", help="Where to write the zips.")],
    per_class: Annotated[int, typer.Option(help="Labeled training images per class (train.zip).")] = 10,
    test_per_class: Annotated[
        int, typer.Option(help="Test images per class (test.zip), disjoint from the training ones.")
    ] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the random choice (same seed, same zips).")] = 0,
    rest: Annotated[
        bool,
        typer.Option("--rest/--no-rest", help="Also write rest.zip: every other image (a gallery pool)."),
    ] = True,
) -> None:
    """Cut train.zip, test.zip and rest.zip out of a labeled image folder or zip (locally, no server)."""
    from kt_train.splits import SplitError, split_imagefolder

    try:
        result = split_imagefolder(src, out_dir, per_class, test_per_class, seed=seed, rest=rest)
    except SplitError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    typer.echo(result.summary())


datasets_app.info.help = (
    "Labeled datasets: split a local folder or zip; upload, list, show, delete on the server."
)
add_remote_commands(app)


if __name__ == "__main__":  # pragma: no cover
    app()

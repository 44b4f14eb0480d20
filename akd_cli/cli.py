"""The `akd` command line: thin typer commands that parse, validate and call the library.

Only the standard library, typer and rich are imported at module level so that `akd --help` is
instant; torch, mmcv and mmdet are imported inside the commands that need them.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from akd_cli import __version__
from akd_cli.errors import UserError

app = typer.Typer(
    name="akd",
    help="Avatar Knowledge Distillation (AvatarKD) for object detectors on mmdet 2.x.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Datasets: generate the synthetic COCO-format shapes dataset.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"akd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Avatar Knowledge Distillation (AvatarKD) for object detectors on mmdet 2.x."""


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("data/synth"), "--out", "-o", help="Directory to write the dataset to."),
    train_images: int = typer.Option(256, min=1, max=1_000_000, help="Training images."),
    val_images: int = typer.Option(64, min=1, max=1_000_000, help="Validation images."),
    image_size: int = typer.Option(128, min=32, max=2048, help="Side of the square images, in pixels."),
    classes: int = typer.Option(6, min=1, help="Number of object classes (shapes)."),
    max_objects: int = typer.Option(6, min=1, max=30, help="Most objects in one image."),
    seed: int = typer.Option(0, min=0, help="Seed: the same seed gives the same dataset."),
    force: bool = typer.Option(False, "--force", help="Replace a directory that holds something else."),
) -> None:
    """Generate the deterministic synthetic COCO-format detection dataset (train and val splits)."""
    from akd_cli import synth

    if classes > synth.MAX_CLASSES:
        raise UserError(f"--classes must be at most {synth.MAX_CLASSES} (the shapes: {', '.join(synth.SHAPES)})")
    spec = synth.SynthSpec(train_images=train_images, val_images=val_images, image_size=image_size,
                           num_classes=classes, max_objects=max_objects, seed=seed)
    console = _console()
    with _progress(console) as progress:
        task = progress.add_task("generating images", total=train_images + val_images)
        try:
            written = synth.generate(spec, out, force=force,
                                     progress=lambda n: progress.advance(task, n))
        except FileExistsError as exc:
            raise UserError(str(exc)) from None
    if written:
        console.print(f"wrote {train_images} train + {val_images} val images ({classes} classes) to {out}")
    else:
        console.print(f"{out} already holds this dataset: nothing to do")


def _progress(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def main(argv: Optional[list] = None) -> None:
    """Entry point of the console script: user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="akd")
    except UserError as exc:
        _console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _console(stderr=True).print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()

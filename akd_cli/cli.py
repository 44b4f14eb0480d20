"""The `akd` command line: thin typer commands that parse, validate and call the library.

Only the standard library, typer and rich are imported at module level so that `akd --help` is
instant; torch, mmcv and mmdet are imported inside the commands that need them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from akd_cli import __version__, names
from akd_cli.errors import UserError

PIPED_WIDTH = 160
app = typer.Typer(
    name="akd",
    help="Avatar Knowledge Distillation (AvatarKD) for object detectors on mmdet 2.x.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Datasets: generate the synthetic COCO-format shapes dataset.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _print_table(console, table) -> None:
    # Piped or logged there is no screen to fit: rich's default of 80 columns would cut cells to
    # "Fa…", which no grep finds. Whole rows then; a terminal (or an explicit COLUMNS) keeps its width.
    if console.is_terminal or "COLUMNS" in os.environ:
        console.print(table)
        return
    width, console.width = console.width, 1000
    try:
        console.print(table)
    finally:
        console.width = width


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


def _call(fn, *args, **kwargs):
    """Run a layer-2 call: failures a user can act on become one-line errors, bugs keep their traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        from akd_cli.mm.checks import friendly_message

        message = friendly_message(exc)
        if message is None:
            raise
        raise UserError(message) from None


def _trust_checkpoints(trust: bool) -> None:
    """--trust-checkpoint: the user's explicit choice to let checkpoints run pickled code when loaded."""
    if trust:
        from akd_cli.mm.checkpoints import TRUST_ENV

        os.environ[TRUST_ENV] = "1"


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
        except OSError as exc:
            raise UserError(f"cannot write the dataset to {out}: {exc.strerror or exc}") from None
    if written:
        console.print(f"wrote {train_images} train + {val_images} val images ({classes} classes) to {out}")
    else:
        console.print(f"{out} already holds this dataset: nothing to do")



# --- presets and configs -------------------------------------------------------------------------

@app.command("presets")
def presets_command(
    filter_: Optional[str] = typer.Argument(None, metavar="[FILTER]", help="Show presets whose name contains this."),
    tiny: Optional[bool] = typer.Option(None, "--tiny/--full", help="Only the tiny (CPU) or the full (COCO) presets."),
) -> None:
    """List the presets: student, teacher, base loss, Avatars and the paper's reference mAPs."""
    from rich.table import Table

    from akd_cli.presets import list_presets

    table = Table(title="akd presets", title_justify="left")
    table.add_column("name", no_wrap=True, style="bold")
    for column in ("student", "teacher", "method", "avatars", "epochs", "paper mAP (S / T / AKD)"):
        table.add_column(column)
    shown = 0
    for p in list_presets():
        if (filter_ and filter_ not in p.name) or (tiny is not None and p.tiny != tiny):
            continue
        refs = " / ".join("-" if v is None else f"{v:.1f}" for v in
                          (p.student.reference_map, p.teacher.reference_map, p.reference_akd_map))
        name = p.name + "".join(f"\n= {alias}" for alias in p.aliases) + (f"\n(variant of {p.variant_of})"
                                                                           if p.variant_of else "")
        table.add_row(name, p.student.name or str(p.student.config), p.teacher.name or str(p.teacher.config),
                      p.method, f"{p.num_avatars} x {p.perturbation} {p.drop_rate:g} ({p.uncertainty})",
                      str(p.epochs), refs)
        shown += 1
    if not shown:
        raise UserError(f"no preset matches {filter_!r}" if filter_ else "no presets found")
    _print_table(_console(), table)


def _choices(name: str, values) -> type:
    """A typer choice type over one of akd_cli.names' lists (help shows [a|b|c]; typos are refused)."""
    import enum

    return enum.Enum(name, {v: v for v in values}, type=str)


Method = _choices("Method", names.METHODS)
Uncertainty = _choices("Uncertainty", names.UNCERTAINTY_MODES)
Weighting = _choices("Weighting", names.AVATAR_WEIGHTINGS)
Perturbation = _choices("Perturbation", names.PERTURBATIONS)
AvatarKernel = _choices("AvatarKernel", names.AVATAR_KERNELS_CLI)
Device = _choices("Device", names.DEVICES)
Launcher = _choices("Launcher", names.LAUNCHERS)
EvalRole = _choices("EvalRole", names.EVAL_ROLES)
TableFormat = _choices("TableFormat", names.TABLE_FORMATS)
Logger = _choices("Logger", names.LOGGERS)


def _value(choice):
    return None if choice is None else choice.value


def _path(value: Optional[Path]) -> Optional[str]:
    return None if value is None else str(value)


def _complete_preset(incomplete: str) -> List[str]:
    """Shell completion of preset names: the files' names, without reading them (stays instant)."""
    from akd_cli.presets import preset_paths

    return [name for name in preset_paths() if name.startswith(incomplete)]


_PRESET = typer.Option(None, "--preset", "-p", help="Preset name (see 'akd presets') or a preset YAML file.",
                       autocompletion=_complete_preset)
_DATA_ROOT = typer.Option(None, "--data-root", help="Dataset root (COCO layout), replacing the preset's.")
_TEACHER_CKPT = typer.Option(None, "--teacher-checkpoint", help="Teacher weights: a path or URL (default: the preset's).")
_METHOD = typer.Option(None, "--method", help="Base loss, or none (the student baseline).")
_AVATARS = typer.Option(None, "--num-avatars", "--avatars", min=0, max=64, help="Avatars per level (0: the plain base loss).")
_DROP = typer.Option(None, "--drop-rate", min=0.0, max=0.99, help="Avatar perturbation strength in [0, 1).")
_UNC = typer.Option(None, "--uncertainty", help="Uncertainty factor: the paper's sigma, the release's computation, or none.")
_WEIGHTING = typer.Option(None, "--weighting", help="How several Avatars combine: their mean, or akd's inverse-variance weights.")
_PERTURB = typer.Option(None, "--perturbation", help="How an Avatar is drawn from the teacher feature.")
_KERNEL = typer.Option(None, "--avatar-kernel",
                       help="loop: one Avatar at a time (torch's dropout); compiled: all of a level's Avatars in a few "
                            "torch.compile'd passes (counter-based dropout; cwd, mse, mgd, pkd, maskd).")
_EPOCHS = typer.Option(None, "--epochs", min=1, max=1000, help="Training epochs (default: the preset's schedule).")
_BATCH = typer.Option(None, "--batch-size", min=1, max=1024, help="Images per GPU (per worker).")
_CFG_OPTS = typer.Option(None, "--cfg-options", help="Override config keys: key=value (repeatable).")
_TRAIN_TEACHER = typer.Option(False, "--train-teacher", help="Train the preset's teacher model alone.")
_LEARN_TOKENS = typer.Option(False, "--learn-tokens",
                             help="MasKD's first stage: learn receptive tokens on the teacher (writes tokens.pth).")
_TOKENS = typer.Option(None, "--token-file", "--tokens",
                       help="MasKD token file (from --learn-tokens, or MasKD's released files).")
_ITERS = typer.Option(None, "--iters", min=1, max=10_000_000, help="Token-learning iterations (default 2000).")
_DEVICE = typer.Option(Device.auto.value, "--device", help="Where the workers run (cpu: gloo).")
_TRUST = typer.Option(False, "--trust-checkpoint", help="Allow checkpoints that need pickled code to load.")


def _kind(train_teacher: bool, learn_tokens: bool) -> str:
    if train_teacher and learn_tokens:
        raise UserError("--train-teacher and --learn-tokens are different runs: pass one of them")
    return "teacher" if train_teacher else ("tokens" if learn_tokens else "student")


def _cfg_options(items: Optional[List[str]]) -> dict:
    from akd_cli.mm.config import parse_cfg_options

    return parse_cfg_options(items or [])


@app.command("config")
def config_command(
    preset: Optional[str] = _PRESET,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of printing."),
    data_root: Optional[Path] = _DATA_ROOT, teacher_checkpoint: Optional[str] = _TEACHER_CKPT,
    method: Optional[Method] = _METHOD, num_avatars: Optional[int] = _AVATARS, drop_rate: Optional[float] = _DROP,
    uncertainty: Optional[Uncertainty] = _UNC, weighting: Optional[Weighting] = _WEIGHTING,
    perturbation: Optional[Perturbation] = _PERTURB, avatar_kernel: Optional[AvatarKernel] = _KERNEL,
    epochs: Optional[int] = _EPOCHS, batch_size: Optional[int] = _BATCH, cfg_options: Optional[List[str]] = _CFG_OPTS,
    train_teacher: bool = _TRAIN_TEACHER, learn_tokens: bool = _LEARN_TOKENS, token_file: Optional[str] = _TOKENS,
    iters: Optional[int] = _ITERS,
) -> None:
    """Print (or write) the complete mmdet config a preset runs, without training."""
    from akd_cli.options import TrainOptions

    if preset is None:
        raise UserError("--preset is required (see 'akd presets')")
    options = TrainOptions(
        preset=preset, data_root=_path(data_root), teacher_checkpoint=teacher_checkpoint, method=_value(method),
        num_avatars=num_avatars, drop_rate=drop_rate, uncertainty=_value(uncertainty), weighting=_value(weighting),
        perturbation=_value(perturbation), avatar_kernel=_value(avatar_kernel), epochs=epochs, batch_size=batch_size,
        cfg_options=_cfg_options(cfg_options),
        kind=_kind(train_teacher, learn_tokens), token_file=token_file, iters=iters)
    from akd_cli.mm.config import dump_config
    from akd_cli.mm.runs import prepare

    run = _call(prepare, options)
    cfg = run.config
    for note in run.notes:
        _console(stderr=True).print(note, highlight=False, soft_wrap=True)
    if out:
        dump_config(cfg, out)
        _console().print(f"wrote {out}")
    else:
        typer.echo(cfg.pretty_text)


@app.command("train")
def train_command(
    preset: Optional[str] = _PRESET,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Your own config instead of a preset."),
    data_root: Optional[Path] = _DATA_ROOT,
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", "-w", help="Where checkpoints and logs go."),
    teacher_checkpoint: Optional[str] = _TEACHER_CKPT,
    gpus: int = typer.Option(1, "--gpus", "--nproc-per-node", min=1, max=1024, help="Workers on this machine (one per GPU)."),
    device: Device = _DEVICE,
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines taking part."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's index among --nnodes."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Address of the node with rank 0."),
    master_port: Optional[int] = typer.Option(None, "--master-port", min=1024, max=65535,
                                              help="Its port (default: free port on one node, 29500 on several)."),
    launcher: Launcher = typer.Option(Launcher.pytorch.value, "--launcher",
                                      help="pytorch (akd starts the workers) or slurm (srun starts them)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition, with --launcher slurm."),
    batch_size: Optional[int] = _BATCH, epochs: Optional[int] = _EPOCHS, num_avatars: Optional[int] = _AVATARS,
    drop_rate: Optional[float] = _DROP, uncertainty: Optional[Uncertainty] = _UNC,
    weighting: Optional[Weighting] = _WEIGHTING, perturbation: Optional[Perturbation] = _PERTURB,
    avatar_kernel: Optional[AvatarKernel] = _KERNEL, method: Optional[Method] = _METHOD,
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (the same on every worker)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic cuDNN kernels."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision (CUDA only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the work dir's latest checkpoint."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Evaluate on the val split at the end."),
    train_teacher: bool = _TRAIN_TEACHER, learn_tokens: bool = _LEARN_TOKENS, token_file: Optional[str] = _TOKENS,
    iters: Optional[int] = _ITERS,
    trust_checkpoint: bool = _TRUST,
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show mmdet's whole log on the console (always in the work dir's log file)."),
    logger: Optional[List[Logger]] = typer.Option(None, "--logger", help="Also log to tensorboard or wandb (repeatable)."),
    cfg_options: Optional[List[str]] = _CFG_OPTS,
) -> None:
    """Train a student with AKD (or a baseline, a tiny teacher, MasKD's tokens), on one or many workers."""
    from akd_cli.options import LaunchPlan, TrainOptions

    plan = LaunchPlan(nproc_per_node=gpus, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                      master_port=master_port, device=device.value, launcher=launcher.value, partition=partition)
    options = TrainOptions(
        preset=preset, config=_path(config), data_root=_path(data_root), work_dir=_path(work_dir),
        teacher_checkpoint=teacher_checkpoint, method=_value(method), num_avatars=num_avatars, drop_rate=drop_rate,
        uncertainty=_value(uncertainty), weighting=_value(weighting), perturbation=_value(perturbation),
        avatar_kernel=_value(avatar_kernel), epochs=epochs, batch_size=batch_size,
        cfg_options=_cfg_options(cfg_options), kind=_kind(train_teacher, learn_tokens), token_file=token_file,
        iters=iters, seed=seed, deterministic=deterministic, amp=amp, resume=resume, validate=validate,
        verbose=verbose, trust_checkpoint=trust_checkpoint, loggers=tuple(_value(v) for v in logger or []), launch=plan)
    from akd_cli.mm.runs import launch_training

    console = _console()
    student = _call(launch_training, options, on_config=lambda p: console.print(f"config: {p}"),
                    say=lambda line: console.print(line, highlight=False, soft_wrap=True))
    if student and learn_tokens:
        console.print(f"[green]done[/]: receptive tokens {student}; distil with them: "
                      f"akd train --preset {preset or '...'} --token-file {student}")
    elif student:
        from akd_cli.mm.train import last_validation

        console.print(f"[green]done[/]: student checkpoint {student}")
        val = last_validation(os.path.dirname(student))
        if val and "bbox_mAP" in val:
            console.print(f"validation (epoch {val.get('epoch')}): bbox mAP {100 * val['bbox_mAP']:.1f}, "
                          f"AP50 {100 * val.get('bbox_mAP_50', 0):.1f}")


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Argument(..., help="An exported student, a full akd checkpoint or a teacher checkpoint."),
    preset: Optional[str] = _PRESET,
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="A config instead of a preset (default: the config.py beside the checkpoint)."),
    data_root: Optional[Path] = _DATA_ROOT,
    gpus: int = typer.Option(1, "--gpus", "--nproc-per-node", min=1, max=1024, help="Workers (one per GPU)."),
    device: Device = _DEVICE,
    batch_size: int = typer.Option(1, "--batch-size", min=1, max=256, help="Images per worker and step."),
    dump: Optional[Path] = typer.Option(None, "--dump", help="Also write the detections here (COCO results format)."),
    role: Optional[EvalRole] = typer.Option(None, "--role", help="Label for the table (default: from the work dir)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where metrics.json goes (default: beside the checkpoint)."),
    trust_checkpoint: bool = _TRUST,
    cfg_options: Optional[List[str]] = _CFG_OPTS,
) -> None:
    """COCO bbox mAP of a checkpoint (AP, AP50, AP75, AP small/medium/large), written to metrics.json."""
    from akd_cli.options import EvalOptions, LaunchPlan

    if not checkpoint.is_file():
        raise UserError(f"checkpoint not found: {checkpoint}")
    options = EvalOptions(checkpoint=str(checkpoint), preset=preset, config=_path(config), data_root=_path(data_root),
                          role=_value(role), dump=_path(dump), batch_size=batch_size,
                          cfg_options=_cfg_options(cfg_options), metrics_file=_path(out),
                          trust_checkpoint=trust_checkpoint,
                          launch=LaunchPlan(nproc_per_node=gpus, device=device.value))
    from akd_cli.mm.evaluate import METRIC_NAMES, launch_eval

    record = _call(launch_eval, options)
    from rich.table import Table

    table = Table(title=f"{record['role']}: {checkpoint}", title_justify="left")
    for name in METRIC_NAMES:
        table.add_column(name, justify="right")
    # pycocotools reports -1 for a size range without ground truth
    table.add_row(*("-" if record["metrics"][n] < 0 else f"{100 * record['metrics'][n]:.1f}" for n in METRIC_NAMES))
    console = _console()
    _print_table(console, table)
    console.print(f"wrote {record['metrics_file']}" + (f" and {dump}" if dump else ""))


@app.command("table")
def table_command(
    workdirs: Optional[List[Path]] = typer.Argument(None, help="Work dirs (searched for metrics.json) or metrics files."),
    readme: Optional[Path] = typer.Option(None, "--readme", help="Write the tables between the akd-table markers of this file."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if --readme's tables are stale; write nothing."),
    format_: TableFormat = typer.Option(TableFormat.markdown.value, "--format", "-f", help="Printed form."),
) -> None:
    """The paper's result tables with our mAPs beside them, from metrics.json files."""
    from akd_cli import results

    if check and readme is None:
        raise UserError("--check needs --readme")
    records, problems = results.collect(workdirs or [])
    err = _console(stderr=True)
    for problem in problems:
        err.print(f"[yellow]warning:[/] {problem}", highlight=False, soft_wrap=True)
    rows = results.build_rows(records)
    block = results.render_markdown(rows)
    if readme is not None:
        changed = results.update_readme(readme, block, check=check)
        if check:
            if changed:
                err.print(f"[red]{readme} is stale[/]: run 'akd table ... --readme {readme}'")
                raise typer.Exit(1)
            _console().print(f"{readme} is up to date")
            return
        _console().print(f"{'updated' if changed else 'unchanged'}: {readme}")
    if format_.value == "markdown":
        _print_rich_tables(rows)
    else:
        typer.echo((results.render_csv if format_.value == "csv" else results.render_json)(rows), nl=False)


def _print_rich_tables(rows) -> None:
    from rich.table import Table

    from akd_cli import results

    console = _console()
    for key, title in results.SECTIONS:
        section = [r for r in rows if r.section == key]
        if not section:
            continue
        table = Table(title=title, title_justify="left", caption="paper / ours (ours - paper)", caption_justify="left")
        columns = results.header(section)
        for column in columns:
            table.add_column(column, justify="left" if column in ("Student", "Teacher", "Base loss") else "right")
        for row in section:
            table.add_row(*results.row_cells(row, columns))
        _print_table(console, table)


@app.command("visualize")
def visualize_command(
    preset: str = typer.Option(..., "--preset", "-p", help="Preset name (see 'akd presets').",
                               autocompletion=_complete_preset),
    checkpoint: List[Path] = typer.Option(..., "--checkpoint",
                                          help="A student (exported or full akd checkpoint); several: the paper's "
                                               "side-by-side figure (e.g. baseline, base loss, AKD)."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="A name per --checkpoint (default: its directory)."),
    image: Path = typer.Option(..., "--image", help="The image to look at."),
    out: Path = typer.Option(Path("vis"), "--out", "-o", help="Directory for the PNGs."),
    data_root: Optional[Path] = _DATA_ROOT,
    teacher_checkpoint: Optional[str] = _TEACHER_CKPT,
    num_avatars: Optional[int] = typer.Option(None, "--num-avatars", "--avatars", min=0, max=16,
                                              help="Avatars to draw (default: the preset's)."),
    levels: Optional[str] = typer.Option(None, "--levels", help="Comma-separated levels to draw (default: all)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the Avatars' perturbations."),
    detections: bool = typer.Option(True, "--detections/--no-detections", help="Also draw teacher and student detections."),
    score_thr: float = typer.Option(0.3, "--score-thr", min=0.0, max=1.0, help="Score threshold for drawn detections."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow checkpoints that need pickled code to load."),
) -> None:
    """Teacher, Avatar, uncertainty and student feature maps for one image (PNG per level); with several
    students, the paper's figure: their heat maps and detections side by side."""
    from akd_cli.mm.visualize import VisualizeRequest, visualize

    try:
        level_list = [int(x) for x in levels.split(",")] if levels else None
    except ValueError:
        raise UserError(f"--levels takes comma-separated integers, got {levels!r}") from None
    _trust_checkpoints(trust_checkpoint)
    request = VisualizeRequest(preset=preset, checkpoints=[str(c) for c in checkpoint], labels=label,
                               data_root=_path(data_root), image=str(image), out=str(out),
                               teacher_checkpoint=teacher_checkpoint, num_avatars=num_avatars, levels=level_list, seed=seed,
                               detections=detections, score_thr=score_thr)
    written = _call(visualize, request)
    _console().print(f"wrote {len(written)} image(s) to {out}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("work_dirs/demo"), "--out", "-o", help="Where the data, runs and table go."),
    train_images: int = typer.Option(256, min=8, max=100_000, help="Synthetic training images."),
    val_images: int = typer.Option(64, min=4, max=100_000, help="Synthetic validation images."),
    teacher_epochs: int = typer.Option(12, min=1, max=500, help="Epochs of the tiny teacher."),
    student_epochs: int = typer.Option(10, min=1, max=500, help="Epochs of each tiny student."),
    seed: int = typer.Option(0, "--seed", min=0, help="One seed for data and all runs."),
    device: Device = _DEVICE,
    force: bool = typer.Option(False, "--force", help="Replace the runs of an earlier demo in --out."),
) -> None:
    """The embedded demo: synthetic data, a tiny teacher, and one student trained four ways."""
    from akd_cli.mm.demo import DemoSpec, run_demo, summary_lines, write_table

    console = _console()
    spec = DemoSpec(out=str(out), train_images=train_images, val_images=val_images, teacher_epochs=teacher_epochs,
                    student_epochs=student_epochs, seed=seed, device=device.value)
    records = _call(run_demo, spec, force=force, say=lambda line: console.rule(line, align="left"))
    table, rows = write_table(out)
    _print_rich_tables(rows)
    for line in summary_lines(records):
        console.print(line)
    console.print(f"table: {table}  ({records['_minutes']['value']} min)")


@app.command("study")
def study_command(
    preset: str = typer.Option(..., "--preset", "-p", help="Preset name (see 'akd presets').",
                               autocompletion=_complete_preset),
    out: Path = typer.Option(..., "--out", "-o", help="Study directory: runs, results, plots (run again to continue)."),
    grid: Optional[List[str]] = typer.Option(None, "--grid", help="An axis: key=v1,v2,... (repeatable; crossed)."),
    variant: Optional[List[str]] = typer.Option(
        None, "--variant", help="A named configuration: NAME:key=value,... (repeatable; each crossed with the grid)."),
    seeds: int = typer.Option(5, "--seeds", min=1, max=1000, help="Seeds 0..N-1 per configuration."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The configuration the others are paired against "
                                                                      "(default: the first)."),
    data_root: Optional[Path] = _DATA_ROOT, teacher_checkpoint: Optional[str] = _TEACHER_CKPT,
    teacher_epochs: Optional[int] = typer.Option(None, "--teacher-epochs", min=1, max=1000,
                                                 help="Tiny presets without a teacher: epochs of the one the study trains."),
    epochs: Optional[int] = _EPOCHS, batch_size: Optional[int] = _BATCH,
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, max=256, help="Runs at once (CPU runs share the cores)."),
    gpus_per_run: int = typer.Option(0, "--gpus-per-run", min=0, max=64, help="GPUs per run (0: CPU runs)."),
    logger: Optional[List[Logger]] = typer.Option(None, "--logger", help="Also log to tensorboard or wandb."),
    cfg_options: Optional[List[str]] = _CFG_OPTS,
) -> None:
    """Configurations x seeds through `akd train`, then mean, sd, 95% CIs and paired tests, with plots."""
    from akd_cli.mm.study import StudySpec, parse_grid, parse_variant, results, run_study, write_results

    spec = StudySpec(preset=preset, out=str(out), seeds=tuple(range(seeds)),
                     variants=tuple(parse_variant(v) for v in variant or []), grid=parse_grid(grid or []),
                     baseline=baseline, data_root=_path(data_root), teacher_checkpoint=teacher_checkpoint,
                     teacher_epochs=teacher_epochs, epochs=epochs, batch_size=batch_size,
                     cfg_options=_cfg_options(cfg_options), jobs=jobs, gpus_per_run=gpus_per_run,
                     loggers=tuple(_value(v) for v in logger or []))
    console = _console()
    total = len(spec.configurations()) * len(spec.seeds)
    console.print(f"study: {len(spec.configurations())} configuration(s) x {len(spec.seeds)} seed(s) = {total} runs "
                  f"in {out}", highlight=False)
    with _progress(console) as progress:
        task = progress.add_task("runs", total=total)

        def update(done, total_, running):
            progress.update(task, completed=done, description=f"runs ({running} running)")
        runs = _call(run_study, spec, say=lambda line: progress.console.print(line, highlight=False),
                     progress=update)
    failed = [r for r in runs if r.state == "failed"]
    for run in failed:
        _error(f"{run.config.label} seed {run.seed} failed: {run.error} (log: {run.work_dir / 'run.log'})")
    result = results(runs, spec.baseline_label, spec.seeds)
    written = write_results(out, result)
    _print_study(result)
    console.print("wrote " + ", ".join(str(p) for p in written), highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _print_study(result) -> None:
    from rich.table import Table

    from akd_cli.mm.study import HEADER, table_rows

    table = Table(title=f"study: AP over seeds (baseline: {result['baseline']})", title_justify="left",
                  caption="paired by seed; p: paired t-test, two-sided; wins: seeds above the baseline",
                  caption_justify="left")
    for column in HEADER:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for cells in table_rows(result):
        table.add_row(*cells)
    _print_table(_console(), table)


@app.command("plot")
def plot_command(
    work_dirs: List[Path] = typer.Argument(..., help="Run work dirs (their *.log.json)."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="The PNG to write."),
    key: Optional[List[str]] = typer.Option(None, "--key", "-k",
                                            help="Only these scalars (or prefixes: loss_akd, sigma_); default: all."),
) -> None:
    """Training curves of several runs on one figure: task losses, AKD terms per level, sigma, val AP."""
    from akd_cli import plots

    for work in work_dirs:
        if not work.is_dir():
            raise UserError(f"not a work dir: {work}")
    path = _call(plots.curves, work_dirs, out, tuple(key or ()))
    _console().print(f"wrote {path}")


def _progress(console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def _is(exc: BaseException, *class_names: str) -> bool:
    # Typer >= 0.20 vendors click privately; the exception classes keep click's names either way.
    return any(cls.__name__ in class_names for cls in type(exc).__mro__)


def main(argv: Optional[list] = None) -> None:
    """Entry point of the console script. Bad input (usage errors and UserError) becomes one line on
    stderr and exit code 2; Ctrl-C exits 130."""
    _whole_lines_when_piped()
    try:
        code = app(args=argv, prog_name="akd", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130) without a word
            code = _interrupted()
    except UserError as exc:
        _error(str(exc))
        code = 2
    except KeyboardInterrupt:
        code = _interrupted()
    except Exception as exc:
        if _is(exc, "NoArgsIsHelpError"):  # `akd` or `akd data` alone: show the help
            exc.show()
            code = 2
        elif _is(exc, "UsageError", "ClickException"):
            ctx = getattr(exc, "ctx", None)
            _error(f"{exc.format_message()} (see '{ctx.command_path if ctx else 'akd'} --help')")
            code = 2
        elif _is(exc, "Abort"):
            code = _interrupted()
        else:
            raise
    sys.exit(code if isinstance(code, int) else 0)


def _whole_lines_when_piped() -> None:
    """Help piped into a file or a pager: typer's rich help would fit 80 columns and cut option
    names ("--token-file,--t…"); with no terminal to fit, lay it out wide (an explicit COLUMNS or
    TERMINAL_WIDTH still wins)."""
    if sys.stdout.isatty() or "COLUMNS" in os.environ or "TERMINAL_WIDTH" in os.environ:
        return
    rich_utils = sys.modules.get("typer.rich_utils")
    if rich_utils is not None:
        rich_utils.MAX_WIDTH = PIPED_WIDTH
    else:
        os.environ["TERMINAL_WIDTH"] = str(PIPED_WIDTH)  # read when typer loads its help renderer


def _interrupted() -> int:
    _console(stderr=True).print("[bold red]interrupted[/]")
    return 130


def _error(message: str) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)


if __name__ == "__main__":
    main()

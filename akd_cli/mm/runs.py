"""Training runs from the command line's point of view: options -> config -> checks -> workers.

Everything here is cheap until ``launch_training`` starts the work, so bad input is refused
before a process is spawned or a file is written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from akd_cli import fileio
from akd_cli.errors import UserError
from akd_cli.options import Job, TrainOptions


@dataclass
class PreparedRun:
    """A run's configs and work dir, resolved once from its options."""
    config: Any                   # the mmcv Config the workers run
    student_config: Optional[Any]  # the student's plain mmdet config, when the run trains one
    work_dir: Path
    notes: tuple = ()             # how the options were resolved, for the user
    resumed: bool = False         # the saved config of a run being resumed


def _resumed(options: TrainOptions, work: Path, config_path: Path) -> PreparedRun:
    """The saved config of the run in ``work``, with what a resume may change."""
    import re

    from mmcv import Config

    from akd_cli.mm.config import merge_cfg_options, read_config, resume_config

    tree = read_config(config_path)._cfg_dict.to_dict()
    epochs = [int(m.group(1)) for p in work.glob("epoch_*.pth") if (m := re.fullmatch(r"epoch_(\d+)\.pth", p.name))]
    notes = resume_config(tree, options, max(epochs) if epochs else None)
    cfg = Config(tree)
    merge_cfg_options(cfg, options.cfg_options)
    return PreparedRun(cfg, None, work, tuple(notes), resumed=True)


def default_work_dir(options: TrainOptions, name: str) -> str:
    if options.kind in ("teacher", "tokens"):
        return os.path.join("work_dirs", f"{name}-{options.kind}")
    method = options.method or "preset"
    suffix = ("baseline" if method == "none"
              else method if options.num_avatars is None else f"{method}-a{options.num_avatars}")
    return os.path.join("work_dirs", f"{name}-{suffix}")


def prepare(options: TrainOptions) -> PreparedRun:
    """The configs these options run, and the work dir. Raises UserError on bad input."""
    from akd_cli.mm import compat

    compat.apply()
    from mmcv import Config

    from akd_cli.mm.config import SHAPING_OPTIONS, apply_options, build_configs, merge_cfg_options, read_config
    from akd_cli.presets import load_preset

    if options.config:
        path = Path(options.config)
        if not path.is_file():
            raise UserError(f"config not found: {path}")
        tree = read_config(path)._cfg_dict.to_dict()
        notes = apply_options(tree, options)
        cfg = Config(tree)
        merge_cfg_options(cfg, options.cfg_options)
        student = path.parent / "student_config.py"
        # The student's plain config beside the file is the student of the run as generated; with
        # options changed here it would no longer describe this run, so only an unchanged run keeps it.
        unchanged = not notes and not options.cfg_options and not any(
            getattr(options, name) is not None for name in SHAPING_OPTIONS)
        return PreparedRun(cfg, Config.fromfile(str(student)) if student.is_file() and unchanged else None,
                           Path(options.work_dir or default_work_dir(options, path.stem)), tuple(notes))
    preset = load_preset(options.preset)
    if options.kind != "teacher" and options.method != "none" and not (
            options.teacher_checkpoint or preset.teacher.checkpoint):
        raise UserError(f"preset {preset.name} has no teacher checkpoint: pass --teacher-checkpoint "
                        f"(train one with 'akd train --preset {preset.name} --train-teacher')"
                        + (", or --method none for a student baseline" if options.kind == "student" else ""))
    configs = build_configs(preset, options)
    return PreparedRun(configs.run, configs.student, Path(options.work_dir or default_work_dir(options, preset.name)),
                       tuple(configs.notes))


def check(options: TrainOptions, cfg, warn=None) -> str:
    """Refuse what cannot run before anything starts; returns the device the workers use. ``warn``
    hears what is not an error but should be known (boxes mmdet will drop)."""
    from akd_cli.mm.checks import check_checkpoint_path
    from akd_cli.mm.data import check_data
    from akd_cli.mm.launch import resolve_device

    device = resolve_device(options.launch)
    if options.amp and device != "cuda":
        raise UserError("--amp needs CUDA GPUs (mixed precision is not supported on the CPU)")
    validates = options.validate and cfg.model.get("type") != "ReceptiveTokenLearner"
    check_data(cfg.data, splits=("train", "val") if validates else ("train",),
               synthetic=cfg.get("akd", {}).get("dataset") == "synth", warn=warn)
    model = cfg.model
    teacher = None
    if model.get("type") == "AKDDistiller" and model.get("teacher") is not None:
        teacher = (model.teacher, model.get("teacher_checkpoint"))
        token_file = (model.get("options") or {}).get("token_file")
        if token_file and "://" not in token_file and not Path(token_file).expanduser().is_file():
            raise UserError(f"MasKD token file not found: {token_file}")
    if model.get("type") == "ReceptiveTokenLearner":
        teacher = (model.detector, model.get("checkpoint"))
    if model.get("type") == "AKDDistiller":
        check_modules(model)  # the preset's module names first: a teacher cannot fit a wrong one
    if teacher is not None:
        check_checkpoint_path(teacher[1], "teacher")
        check_teacher_fits(options, cfg, *teacher)
    return device


def check_teacher_fits(options: TrainOptions, cfg, teacher_cfg, checkpoint: Optional[str]) -> None:
    """The teacher checkpoint was trained on this data's categories and fits the teacher model
    (its head sized to them), refused in one line that says how to get a fitting one otherwise.
    A URL is fetched into torch's cache here, once, where the workers will find it."""
    import copy

    import torch

    from akd_cli.mm.checkpoints import CheckpointMismatch, cached_download, check_fits, read_checkpoint
    from akd_cli.mm.data import split_of
    from mmdet.models import build_detector

    if not checkpoint:
        return
    path = cached_download(checkpoint) if "://" in checkpoint else str(Path(checkpoint).expanduser())
    state_dict, meta = read_checkpoint(path)
    train = split_of(cfg.data, "train") or {}
    classes = tuple(train.get("classes") or ()) or None
    trained_on = meta.get("CLASSES")
    where = f" --data-root {options.data_root}" if options.data_root else ""
    hint = (f"train a teacher on this data (akd train --preset {options.preset} --train-teacher{where}) "
            "or pass a --teacher-checkpoint trained on it") if options.preset else "pass a teacher trained on this data"

    def few(names):
        return ", ".join(map(str, list(names)[:6])) + (", ..." if len(names) > 6 else "")
    if classes and trained_on is not None and tuple(trained_on) != classes:
        raise UserError(f"teacher checkpoint {checkpoint} was trained on {len(trained_on)} categories ({few(trained_on)}); "
                        f"the data has {len(classes)} ({few(classes)}): {hint}")
    with torch.device("meta"):
        model = build_detector(copy.deepcopy(teacher_cfg))
    try:
        check_fits(model, state_dict, checkpoint, "teacher")
    except CheckpointMismatch as exc:
        raise UserError(f"{exc}" + (f" (the data has {len(classes)} categories: {hint})" if classes else "")) from None


def check_modules(model_cfg) -> None:
    """Build the distiller without weights (on torch's meta device: no memory, no download) so that
    a module name the preset gets wrong is refused, naming the field, before anything starts."""
    import copy

    import torch

    import akd_cli.mm.distiller  # noqa: F401  (registers AKDDistiller)
    from mmdet.models import build_detector

    model_cfg = copy.deepcopy(model_cfg)
    (model_cfg.get("options") or {}).pop("token_file", None)
    with torch.device("meta"):
        build_detector(model_cfg)


def launch_training(options: TrainOptions, *, on_config=None, say=None) -> Optional[str]:
    """Write the config into the work dir and run it; returns the exported student's (or tokens') path.
    ``say`` hears one line per note on how the options were resolved."""

    from akd_cli.mm import launch
    from akd_cli.mm.config import dump_config

    say = say or (lambda line: None)
    work = Path(options.work_dir) if options.work_dir else None
    config_path = work / "config.py" if work else None
    if options.resume and config_path is not None and config_path.is_file():
        run = _resumed(options, work, config_path)  # a resumed run continues the run it resumes
    else:
        run = prepare(options)
    for note in run.notes:
        say(note)
    work, cfg = run.work_dir, run.config
    config_path = work / "config.py"
    if options.resume and not run.resumed and config_path.is_file():
        run = _resumed(options, work, config_path)
        for note in run.notes:
            say(note)
        cfg = run.config
    device = check(options, cfg, warn=say)
    fileio.ensure_dir(work, "work dir")  # after the checks: a refused run writes nothing
    if not options.resume and (any(work.glob("epoch_*.pth")) or any(work.glob("iter_*.pth"))):
        raise UserError(f"{work} already holds checkpoints of a run: pass --resume to continue it, "
                        "or choose another --work-dir")
    dump_config(cfg, config_path)
    if run.student_config is not None and not (options.resume and (work / "student_config.py").is_file()):
        dump_config(run.student_config, work / "student_config.py")
    if on_config:
        on_config(config_path)
    job = Job(options=options, config=str(config_path), work_dir=str(work), device=device)
    if options.launch.launcher == "slurm":
        launch.srun(job)
        return None
    return launch.run_job(job)

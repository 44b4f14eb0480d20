"""Training runs from the command line's point of view: options -> config -> checks -> workers.

Everything here is cheap until ``launch_training`` starts the work, so bad input is refused
before a process is spawned or a file is written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from akd_cli.errors import UserError
from akd_cli.options import Job, TrainOptions


@dataclass
class PreparedRun:
    """A run's configs and work dir, resolved once from its options."""
    config: Any                   # the mmcv Config the workers run
    student_config: Optional[Any]  # the student's plain mmdet config, when the run trains one
    work_dir: Path
    notes: tuple = ()             # how the options were resolved, for the user


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

    from akd_cli.mm.config import build_configs
    from akd_cli.presets import load_preset

    if options.config:
        path = Path(options.config)
        if not path.is_file():
            raise UserError(f"config not found: {path}")
        try:
            cfg = Config.fromfile(str(path))
        except Exception as exc:  # a user's file: syntax errors and missing bases are input errors
            raise UserError(f"cannot read config {path}: {' '.join(str(exc).split())[:200]}") from None
        if options.cfg_options:
            cfg.merge_from_dict(options.cfg_options)
        student = path.parent / "student_config.py"
        return PreparedRun(cfg, Config.fromfile(str(student)) if student.is_file() else None,
                           Path(options.work_dir or default_work_dir(options, path.stem)))
    preset = load_preset(options.preset)
    if options.kind != "teacher" and options.method != "none" and not (
            options.teacher_checkpoint or preset.teacher.checkpoint):
        raise UserError(f"preset {preset.name} has no teacher checkpoint: pass --teacher-checkpoint "
                        f"(train one with 'akd train --preset {preset.name} --train-teacher')"
                        + (", or --method none for a student baseline" if options.kind == "student" else ""))
    configs = build_configs(preset, options)
    return PreparedRun(configs.run, configs.student, Path(options.work_dir or default_work_dir(options, preset.name)),
                       tuple(configs.notes))


def check(options: TrainOptions, cfg) -> str:
    """Refuse what cannot run before anything starts; returns the device the workers use."""
    from akd_cli.mm.checks import check_checkpoint_path, check_dataset
    from akd_cli.mm.launch import resolve_device

    device = resolve_device(options.launch)
    if options.amp and device != "cuda":
        raise UserError("--amp needs CUDA GPUs (mixed precision is not supported on the CPU)")
    validates = options.validate and cfg.model.get("type") != "ReceptiveTokenLearner"
    check_dataset(cfg.data, splits=("train", "val") if validates else ("train",),
                  synthetic=cfg.get("akd", {}).get("dataset") == "synth")
    model = cfg.model
    if model.get("type") == "AKDDistiller" and model.get("teacher") is not None:
        check_checkpoint_path(model.get("teacher_checkpoint"), "teacher")
        token_file = (model.get("options") or {}).get("token_file")
        if token_file and "://" not in token_file and not Path(token_file).expanduser().is_file():
            raise UserError(f"MasKD token file not found: {token_file}")
    if model.get("type") == "ReceptiveTokenLearner":
        check_checkpoint_path(model.get("checkpoint"), "teacher")
    if model.get("type") == "AKDDistiller":
        check_modules(model)
    return device


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
    from mmcv import Config

    from akd_cli.mm import launch
    from akd_cli.mm.config import dump_config

    run = prepare(options)
    for note in run.notes:
        if say:
            say(note)
    work, cfg = run.work_dir, run.config
    config_path = work / "config.py"
    if options.resume and config_path.is_file():
        cfg = Config.fromfile(str(config_path))  # a resumed run continues the run it resumes
    device = check(options, cfg)
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

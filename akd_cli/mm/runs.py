"""Training runs from the command line's point of view: preset -> config -> checks -> workers.

Everything here is cheap until ``launch_training`` starts the work, so bad input is refused
before a process is spawned or a file is written.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from akd_cli.errors import UserError
from akd_cli.mm.launch import LaunchPlan


@dataclass
class TrainRequest:
    preset: Optional[str] = None
    config: Optional[str] = None
    data_root: Optional[str] = None
    work_dir: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    method: Optional[str] = None
    avatars: Optional[int] = None
    drop_rate: Optional[float] = None
    uncertainty: Optional[str] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    seed: int = 0
    deterministic: bool = False
    amp: bool = False
    resume: bool = False
    validate: bool = True
    verbose: bool = False
    role: str = "student"         # student | teacher | tokens (MasKD's token-learning stage)
    tokens: Optional[str] = None  # MasKD token file for the distillation
    iters: Optional[int] = None   # token-learning iterations
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    plan: LaunchPlan = field(default_factory=LaunchPlan)
    launcher: str = "pytorch"     # pytorch (akd starts the workers) | slurm
    partition: Optional[str] = None


def default_work_dir(request: TrainRequest, preset_name: str) -> str:
    if request.role in ("teacher", "tokens"):
        return os.path.join("work_dirs", f"{preset_name}-{request.role}")
    method = request.method or "preset"
    suffix = "baseline" if method == "none" else (method if request.avatars is None else f"{method}-a{request.avatars}")
    return os.path.join("work_dirs", f"{preset_name}-{suffix}")


def prepare_config(request: TrainRequest):
    """The config this request runs, and the work dir. Raises UserError on bad input."""
    from akd_cli.mm import compat

    compat.apply()
    from mmcv import Config

    from akd_cli.mm.config import build_config
    from akd_cli.presets import load_preset

    if (request.preset is None) == (request.config is None):
        raise UserError("give exactly one of --preset or --config")
    if request.config:
        path = Path(request.config)
        if not path.is_file():
            raise UserError(f"config not found: {path}")
        try:
            cfg = Config.fromfile(str(path))
        except Exception as exc:  # a user's file: syntax errors and missing bases are input errors
            raise UserError(f"cannot read config {path}: {' '.join(str(exc).split())[:200]}") from None
        if request.cfg_options:
            cfg.merge_from_dict(request.cfg_options)
        name = path.stem
    else:
        preset = load_preset(request.preset)
        if request.role != "teacher" and request.method != "none" and not (
                request.teacher_checkpoint or preset.teacher.checkpoint):
            raise UserError(f"preset {preset.name} has no teacher checkpoint: pass --teacher-checkpoint "
                            f"(train one with 'akd train --preset {preset.name} --train-teacher')"
                            + (", or --method none for a student baseline" if request.role == "student" else ""))
        cfg = build_config(preset, data_root=request.data_root, teacher_checkpoint=request.teacher_checkpoint,
                           method=request.method, num_avatars=request.avatars, drop_rate=request.drop_rate,
                           uncertainty=request.uncertainty, epochs=request.epochs, batch_size=request.batch_size,
                           cfg_options=request.cfg_options, role=request.role, token_file=request.tokens,
                           iters=request.iters)
        name = preset.name
    work_dir = request.work_dir or default_work_dir(request, name)
    return cfg, work_dir


def check_request(request: TrainRequest, cfg) -> str:
    """Refuse what cannot run before anything starts; returns the device the workers use."""
    from akd_cli.mm.checks import check_checkpoint_path, check_dataset
    from akd_cli.mm.launch import resolve_device

    device = resolve_device(request.plan)
    if request.amp and device != "cuda":
        raise UserError("--amp needs CUDA GPUs (mixed precision is not supported on the CPU)")
    validates = request.validate and cfg.model.get("type") != "ReceptiveTokenLearner"
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
    return device


def launch_training(request: TrainRequest, *, on_config=None) -> Optional[str]:
    """Write the config into the work dir and run it; returns the exported student's (or tokens') path."""
    from akd_cli.mm import launch
    from akd_cli.mm.config import dump_config, student_config
    from akd_cli.mm.train import WorkerOptions, train

    cfg, work_dir = prepare_config(request)
    work = Path(work_dir)
    config_path = work / "config.py"
    if request.resume and config_path.is_file():
        from mmcv import Config
        cfg = Config.fromfile(str(config_path))  # a resumed run continues the run it resumes
    device = check_request(request, cfg)
    if not request.resume and (any(work.glob("epoch_*.pth")) or any(work.glob("iter_*.pth"))):
        raise UserError(f"{work} already holds checkpoints of a run: pass --resume to continue it, "
                        "or choose another --work-dir")
    dump_config(cfg, config_path)
    if cfg.model.get("type") == "AKDDistiller":
        dump_config(student_config(cfg), work / "student_config.py")
    if on_config:
        on_config(config_path)
    options = WorkerOptions(seed=request.seed, deterministic=request.deterministic, resume=request.resume,
                            amp=request.amp, validate=request.validate and request.role != "tokens",
                            verbose=request.verbose)
    if request.launcher == "slurm":
        return _slurm(request, str(config_path), str(work), options)
    if request.plan.world_size == 1:
        return train(str(config_path), str(work), options)
    worker_args = [str(config_path), str(work), *options.to_argv()]
    result = Path(tempfile.mkdtemp(prefix="akd-")) / "result.json"
    try:
        launch.run_workers(worker_args + ["--result-file", str(result)], request.plan, device)
        if result.is_file():
            return json.loads(result.read_text())["exported"]
        return None
    finally:
        shutil.rmtree(result.parent, ignore_errors=True)


def _slurm(request: TrainRequest, config_path: str, work_dir: str, options) -> Optional[str]:
    from akd_cli.mm import launch
    from akd_cli.mm.train import train

    if launch.in_slurm_step():
        os.environ.update(launch.slurm_env(request.plan.master_port or 29500))
        return train(config_path, work_dir, options)
    argv = [a for a in sys.argv[1:]]
    cmd = launch.srun_command(argv, request.plan, request.partition)
    if shutil.which("srun") is None:
        raise UserError(f"srun not found: run this inside a Slurm allocation, e.g. {launch.describe(cmd)}")
    print(f"starting: {launch.describe(cmd)}", flush=True)
    os.execvp(cmd[0], cmd)
    return None

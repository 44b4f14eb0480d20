"""The options of a run, parsed once by the command line and carried as one object from there to
the config and into every worker.

``TrainOptions`` and ``EvalOptions`` are validated on construction (the CLI, the demo and library
users all get the same checks and the same one-line errors), and a ``Job`` (the options plus what
the launcher resolved: the config file, the work dir, the device) is the one hand-off format
between the launcher and its workers: in-process as an object, across processes as JSON.
Standard library only.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from akd_cli import names
from akd_cli.errors import UserError


def _one_of(value: Optional[str], choices, option: str) -> None:
    if value is not None and value not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _in_range(value, low, high, option: str, high_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not (low <= value and (value < high if high_open else value <= high)):
        raise UserError(f"{option} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


@dataclass(frozen=True)
class LaunchPlan:
    """Where and how the workers of a run start."""
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None
    device: str = "auto"            # names.DEVICES
    launcher: str = "pytorch"       # names.LAUNCHERS
    partition: Optional[str] = None  # Slurm partition

    def __post_init__(self):
        _one_of(self.device, names.DEVICES, "--device")
        _one_of(self.launcher, names.LAUNCHERS, "--launcher")
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise UserError("--gpus and --nnodes must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank must be in [0, {self.nnodes - 1}], got {self.node_rank}")
        _in_range(self.master_port, 1024, 65535, "--master-port")
        if self.partition and self.launcher != "slurm":
            raise UserError("--partition is a Slurm option: add --launcher slurm")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class TrainOptions:
    """Everything `akd train` (and `akd config`) is told. None means: the preset's value."""
    preset: Optional[str] = None
    config: Optional[str] = None
    data_root: Optional[str] = None
    work_dir: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    method: Optional[str] = None          # names.METHODS
    num_avatars: Optional[int] = None
    drop_rate: Optional[float] = None
    uncertainty: Optional[str] = None     # names.UNCERTAINTY_MODES
    weighting: Optional[str] = None       # names.AVATAR_WEIGHTINGS
    perturbation: Optional[str] = None    # names.PERTURBATIONS
    avatar_kernel: Optional[str] = None   # names.AVATAR_KERNELS_CLI; None: the loop
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    kind: str = "student"                 # names.RUN_KINDS
    token_file: Optional[str] = None      # MasKD receptive tokens for the distillation
    iters: Optional[int] = None           # length of token learning
    seed: int = 0
    deterministic: bool = False
    amp: bool = False
    resume: bool = False
    validate: bool = True
    verbose: bool = False
    trust_checkpoint: bool = False
    loggers: Tuple[str, ...] = ()        # names.LOGGERS, beside the text and JSON logs
    launch: LaunchPlan = field(default_factory=LaunchPlan)

    def __post_init__(self):
        object.__setattr__(self, "loggers", tuple(self.loggers))  # JSON gives a list
        for logger in self.loggers:
            _one_of(logger, names.LOGGERS, "--logger")
        if (self.preset is None) == (self.config is None):
            raise UserError("give exactly one of --preset or --config")
        _one_of(self.method, names.METHODS, "--method")
        _one_of(self.uncertainty, names.UNCERTAINTY_MODES, "--uncertainty")
        _one_of(self.weighting, names.AVATAR_WEIGHTINGS, "--weighting")
        _one_of(self.perturbation, names.PERTURBATIONS, "--perturbation")
        _one_of(self.avatar_kernel, names.AVATAR_KERNELS_CLI, "--avatar-kernel")
        _one_of(self.kind, names.RUN_KINDS, "the run kind")
        _in_range(self.num_avatars, 0, 64, "--num-avatars")
        _in_range(self.drop_rate, 0.0, 1.0, "--drop-rate", high_open=True)
        _in_range(self.epochs, 1, 1000, "--epochs")
        _in_range(self.batch_size, 1, 1024, "--batch-size")
        _in_range(self.iters, 1, 10_000_000, "--iters")
        if self.kind == "tokens" and (self.token_file or self.epochs):
            raise UserError("--learn-tokens makes tokens (--iters sets its length); "
                            "--token-file and --epochs are for training")
        avatar_flags = [f"--{name.replace('_', '-')}" for name in names.AVATAR_OPTIONS if getattr(self, name) is not None]
        if avatar_flags and (self.kind != "student" or self.method == "none"):
            run = {"teacher": "trains the teacher alone", "tokens": "learns MasKD's tokens on the teacher"}.get(
                self.kind, "trains the student without distillation (--method none)")
            raise UserError(f"{', '.join(avatar_flags)}: this run {run}, so it has no Avatars to set")
        if self.iters and self.kind != "tokens":
            raise UserError("--iters sets the length of --learn-tokens; training runs use --epochs")


@dataclass(frozen=True)
class EvalOptions:
    """Everything `akd eval` is told."""
    checkpoint: str
    preset: Optional[str] = None
    config: Optional[str] = None
    data_root: Optional[str] = None
    role: Optional[str] = None            # names.EVAL_ROLES; default: from the work dir
    dump: Optional[str] = None
    batch_size: int = 1
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    metrics_file: Optional[str] = None
    trust_checkpoint: bool = False
    launch: LaunchPlan = field(default_factory=LaunchPlan)

    def __post_init__(self):
        if self.preset and self.config:
            raise UserError("give at most one of --preset and --config")
        _one_of(self.role, names.EVAL_ROLES, "--role")
        _in_range(self.batch_size, 1, 256, "--batch-size")
        if self.launch.launcher != "pytorch":
            raise UserError("akd eval starts its own workers (--launcher slurm is for akd train)")


Options = Union[TrainOptions, EvalOptions]


@dataclass(frozen=True)
class Job:
    """What each worker of a run is handed: the options, and what the launcher resolved from them
    once (the config file to run, the work dir, the device), so no worker re-derives any of it."""
    options: Options
    config: str
    work_dir: str
    device: str                        # cuda | cpu, resolved against the machine
    result_file: Optional[str] = None  # where rank 0 writes its result when it runs in another process

    @property
    def kind(self) -> str:
        return "train" if isinstance(self.options, TrainOptions) else "eval"

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        raw = json.loads(text)
        kind = raw.pop("kind")
        opts = dict(raw.pop("options"))
        opts["launch"] = LaunchPlan(**opts.get("launch", {}))
        options = (TrainOptions if kind == "train" else EvalOptions)(**opts)
        return cls(options=options, **raw)

    def write(self, path: Union[str, Path]) -> Path:
        from akd_cli import fileio

        return fileio.write_text(path, self.to_json() + "\n")

    @classmethod
    def read(cls, path: Union[str, Path]) -> "Job":
        return cls.from_json(Path(path).read_text())

    def with_result_file(self, path: Optional[str]) -> "Job":
        return replace(self, result_file=path)

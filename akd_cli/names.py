"""Every name list of akd, in one place: the core, the presets, the configs and the CLI all read
them from here (typer's choices too), so a new base loss or mode is added once.

Standard library only: the CLI imports this for `akd --help`.
"""
from __future__ import annotations

# Feature-distillation base losses (akd_cli.core.losses.BASE_LOSSES has one class per name).
BASE_LOSSES = ("cwd", "mgd", "maskd", "fgd", "pkd", "mse")
# Distillation terms on head outputs (akd_cli.core.head_losses), beside the feature loss.
HEAD_LOSSES = ("l1", "smooth_l1", "dist")
# What a run distils with: a base loss, or "none" (the student baseline, no teacher).
METHODS = BASE_LOSSES + ("none",)
# The uncertainty factor (akd_cli.core.uncertainty): the paper's sigma, the release's computation, none.
UNCERTAINTY_MODES = ("paper", "release", "none")
# How several Avatars combine: their mean (the paper's E_k), or akd's inverse-variance weights.
AVATAR_WEIGHTINGS = ("mean", "inverse_variance")
# How an Avatar is drawn from the teacher feature (akd_cli.core.avatars).
PERTURBATIONS = ("dropout", "channel", "noise")
# How the Avatars of a level are computed (akd_cli.core.akd): one at a time ("loop", the reference
# and the CPU's default), or all in a few compiled passes over the teacher ("compiled"); "fused" runs
# those passes uncompiled, to check them. The CLI offers AVATAR_KERNELS_CLI.
AVATAR_KERNELS = ("loop", "compiled", "fused")
AVATAR_KERNELS_CLI = ("loop", "compiled")
# Where dropout masks come from: torch's generator, or the counter-based one the fused passes need.
AVATAR_RNGS = ("torch", "counter")
# The TrainOptions fields that set a distillation's Avatars (`--num-avatars`, ...): a run without a
# distillation has none to set.
AVATAR_OPTIONS = ("num_avatars", "drop_rate", "uncertainty", "weighting", "perturbation", "avatar_kernel")
# Where the workers run: "auto" is CUDA when torch sees a GPU, else the CPU.
DEVICES = ("auto", "cuda", "cpu")
# Who starts the workers: akd itself (torch.distributed, one process per GPU) or Slurm's srun.
LAUNCHERS = ("pytorch", "slurm")
# What a training run trains: the distilled student, the preset's teacher alone, or MasKD's tokens.
RUN_KINDS = ("student", "teacher", "tokens")
# How `akd eval` and `akd table` label a measured checkpoint: akd is AKD with the preset's factor
# (the release's, which produced the paper's numbers), akd-paper AKD with the paper's sigma.
EVAL_ROLES = ("teacher", "baseline", "kd", "akd", "akd-paper")
# Printed forms of `akd table`.
TABLE_FORMATS = ("markdown", "csv", "json")
# Detector families whose base-loss settings the methods' own COCO configs give (presets' `family`).
FAMILIES = ("two_stage", "retinanet", "fcos", "reppoints")
# The two tables of the paper (AvatarKD README), and the section of the tiny presets.
PAPER_TABLES = ("baseline", "stronger")
# What `akd study --grid KEY=...` and `--variant NAME:KEY=...` may vary: the training options that
# define a configuration (each a TrainOptions field of that name); seeds are the study's own axis.
STUDY_KEYS = ("method", "num_avatars", "drop_rate", "uncertainty", "weighting", "perturbation", "avatar_kernel", "epochs",
              "batch_size")
# Metrics a study summarises over seeds (metrics.json names).
STUDY_METRICS = ("AP", "AP50", "AP75")
# Training loggers besides the text and JSON logs every run writes (mmcv logger hooks).
LOGGERS = ("tensorboard", "wandb")

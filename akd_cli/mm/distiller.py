"""The mmdet 2.x integration: a distiller detector, its optimizer constructor, runner and hooks.

Importing this module registers, in mmdet's and mmcv's registries:
- ``AKDDistiller`` (DETECTORS): a trainable student plus a frozen teacher; named module outputs of
  both are recorded by forward hooks and distilled with ``AKDLoss``; at test time it is the student;
- ``AKDOptimizerConstructor`` (OPTIMIZER_BUILDERS): the optimizer never sees the teacher;
- ``AKDEpochBasedRunner``, ``AKDIterBasedRunner`` (RUNNERS): checkpoints written atomically
  (temporary file, then rename);
- ``RichProgressHook`` (HOOKS): a progress bar with ETA and the current losses.
Generated configs import it through ``custom_imports``, so mmdet's own tools run them too.
"""
from __future__ import annotations

import difflib
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

from akd_cli.mm import compat

compat.apply()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from mmcv.runner import (HOOKS, OPTIMIZER_BUILDERS, RUNNERS, DefaultOptimizerConstructor,  # noqa: E402
                         EpochBasedRunner, Hook, IterBasedRunner, get_dist_info)
from mmdet.models import DETECTORS, build_detector  # noqa: E402
from mmdet.models.detectors.base import BaseDetector  # noqa: E402

from akd_cli.core import AKDLoss  # noqa: E402
from akd_cli.errors import UserError  # noqa: E402

BACKBONE_ONLY_PREFIXES = ("backbone", "neck")


def _build_akd_loss(method: str, channels: List[int], avatars: dict, options: dict) -> AKDLoss:
    options = dict(options)
    token_file = options.get("token_file")
    if token_file:  # read once here for a one-line error on a missing, corrupt or unsafe file
        try:
            local = compat.cached_download(token_file) if "://" in token_file else os.path.expanduser(token_file)
        except OSError as exc:  # urllib's errors are OSErrors: no network, 404, refused
            raise UserError(f"cannot download the MasKD token file {token_file}: {exc}") from None
        if not osp.isfile(local):
            raise UserError(f"MasKD token file not found: {token_file}")
        compat.load_checkpoint_file(local, map_location="cpu")
        options["token_file"] = local
    try:
        return AKDLoss(base=method, channels=channels, num_levels=len(channels), **avatars, **options)
    except ValueError as exc:  # options of the preset or --cfg-options: the user's input
        raise UserError(str(exc)) from None


def find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [m for m in modules if m], n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"{role} has no module {name!r}{hint}")
    return modules[name]


class FeatureRecorder:
    """Records the outputs of named submodules while ``recording`` is on.

    A module called once with a tuple output (an FPN neck) yields its levels; a module called once
    per level (a shared head branch) yields one output per call.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str):
        self.outputs: Dict[str, List[torch.Tensor]] = {}
        self.recording = False
        self._handles = [find_module(model, name, role).register_forward_hook(self._hook(name))
                         for name in dict.fromkeys(names)]

    def _hook(self, name):
        def record(module, inputs, output):
            if self.recording:
                self.outputs.setdefault(name, []).append(output)
        return record

    def start(self):
        self.outputs = {}
        self.recording = True

    def stop(self):
        self.recording = False

    def levels(self, name: str) -> List[torch.Tensor]:
        calls = self.outputs.get(name, [])
        if len(calls) == 1 and isinstance(calls[0], (tuple, list)):
            return list(calls[0])
        return list(calls)


@DETECTORS.register_module()
class AKDDistiller(BaseDetector):
    """A student trained with Avatar Knowledge Distillation from a frozen teacher.

    Args:
        student, teacher: mmdet model configs. ``teacher`` may be None (a student baseline).
        teacher_checkpoint: loaded into the teacher by ``init_weights`` (so that mmdet's own
            ``model.init_weights()`` cannot overwrite it).
        distill: one dict per distilled feature: ``name``, ``student`` and ``teacher`` (module
            paths), ``channels`` (teacher channels per level), optional ``student_channels``.
        method: base loss (``cwd``, ``mgd``, ...); ``options``: its keyword arguments.
        avatars: ``num_avatars``, ``drop_rate``, ``uncertainty``, ``perturbation``.
    """

    def __init__(self, student: dict, teacher: Optional[dict] = None, teacher_checkpoint: Optional[str] = None,
                 distill: Sequence[dict] = (), method: str = "cwd", options: Optional[dict] = None,
                 avatars: Optional[dict] = None, train_cfg=None, test_cfg=None, pretrained=None, init_cfg=None):
        super().__init__(init_cfg)
        self.student = build_detector(student)
        self.teacher = build_detector(teacher) if teacher is not None else None
        self.teacher_checkpoint = teacher_checkpoint
        self.method = method
        self.distill = [dict(d) for d in distill] if self.teacher is not None else []
        avatars = dict(avatars or {})
        self.align = nn.ModuleDict()
        self.akd_losses = nn.ModuleDict()
        for spec in self.distill:
            channels = list(spec["channels"])
            student_channels = list(spec.get("student_channels") or channels)
            if student_channels != channels:
                self.align[spec["name"]] = nn.ModuleList(
                    nn.Conv2d(s, t, kernel_size=1) for s, t in zip(student_channels, channels))
            self.akd_losses[spec["name"]] = _build_akd_loss(method, channels, avatars, options or {})
        if self.teacher is not None:
            self.teacher.eval()
            for param in self.teacher.parameters():
                param.requires_grad_(False)
        self.student_recorder = FeatureRecorder(self.student, [d["student"] for d in self.distill], "student")
        self.teacher_recorder = (FeatureRecorder(self.teacher, [d["teacher"] for d in self.distill], "teacher")
                                 if self.distill else None)
        self._teacher_features_only = all(d["teacher"].split(".")[0] in BACKBONE_ONLY_PREFIXES
                                          for d in self.distill)

    # --- the student is the detector --------------------------------------------------------
    @property
    def CLASSES(self):  # noqa: N802 (mmdet's attribute name)
        return getattr(self.student, "CLASSES", None)

    @CLASSES.setter
    def CLASSES(self, value):  # noqa: N802
        self.student.CLASSES = value
        if self.teacher is not None:
            self.teacher.CLASSES = value

    def init_weights(self):
        # The align convs and loss modules keep torch's default initialisation; the teacher is
        # loaded, never initialised (its init_cfg may point at ImageNet weights we must not fetch).
        self.student.init_weights()
        if self.teacher is not None and self.teacher_checkpoint:
            load_weights(self.teacher, self.teacher_checkpoint, "teacher")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BN statistics and dropout as at inference, always
        return self

    def extract_feat(self, img):
        return self.student.extract_feat(img)

    def simple_test(self, img, img_metas, **kwargs):
        return self.student.simple_test(img, img_metas, **kwargs)

    def aug_test(self, imgs, img_metas, **kwargs):
        return self.student.aug_test(imgs, img_metas, **kwargs)

    def forward_dummy(self, img):
        return self.student.forward_dummy(img)

    def show_result(self, *args, **kwargs):
        return self.student.show_result(*args, **kwargs)

    # --- training ---------------------------------------------------------------------------
    def forward_train(self, img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore=None, **kwargs):
        if not self.distill:
            return self.student.forward_train(img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore, **kwargs)
        self.student_recorder.start()
        try:
            losses = self.student.forward_train(img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore, **kwargs)
        finally:
            self.student_recorder.stop()
        self.teacher_recorder.start()
        try:
            with torch.no_grad():
                if self._teacher_features_only:
                    self.teacher.extract_feat(img)
                else:
                    self.teacher.forward_dummy(img)
        finally:
            self.teacher_recorder.stop()
        context = {"gt_bboxes": gt_bboxes, "img_shape": tuple(img.shape[-2:])} if self.method == "fgd" else {}
        for spec in self.distill:
            name = spec["name"]
            student_feats = self.student_recorder.levels(spec["student"])
            teacher_feats = self.teacher_recorder.levels(spec["teacher"])
            if len(student_feats) != len(spec["channels"]) or len(teacher_feats) != len(spec["channels"]):
                raise ValueError(f"feature {name!r}: the config declares {len(spec['channels'])} level(s), "
                                 f"recorded {len(student_feats)} from student module {spec['student']!r} and "
                                 f"{len(teacher_feats)} from teacher module {spec['teacher']!r}")
            if name in self.align:
                student_feats = [conv(f) for conv, f in zip(self.align[name], student_feats)]
            losses[f"loss_akd_{self.method}_{name}"] = self.akd_losses[name](student_feats, teacher_feats, **context)
        return losses

    def train_step(self, data, optimizer):
        outputs = super().train_step(data, optimizer)
        if not math.isfinite(outputs["log_vars"]["loss"]):
            bad = [k for k, v in outputs["log_vars"].items() if not math.isfinite(v)]
            raise FloatingPointError(f"non-finite loss ({', '.join(bad)}): stopping instead of training on; "
                                     "lower the learning rate or the distillation weight, or check the data")
        return outputs


def load_weights(model: nn.Module, checkpoint: str, role: str) -> None:
    """Load a checkpoint into a model; a checkpoint that does not fit names the mismatched keys."""
    from mmcv.runner.checkpoint import CheckpointLoader

    state = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")  # weights_only: see compat
    state_dict = state.get("state_dict", state) if isinstance(state, dict) else state
    state_dict = {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    load_checked(model, state_dict, checkpoint, role)


def load_checked(model: nn.Module, state_dict: dict, checkpoint: str, role: str) -> None:
    """Load weights that fit the model (``check_fits``), else raise CheckpointMismatch naming the keys."""
    check_fits(model, state_dict, checkpoint, role)
    model.load_state_dict(state_dict, strict=False)  # check_fits was strict about everything but counters


class CheckpointMismatch(ValueError):
    pass


def check_fits(model: nn.Module, state_dict: dict, checkpoint: str, role: str) -> None:
    own = model.state_dict()
    # BatchNorm's num_batches_tracked is a counter, not a weight; checkpoints of older torch lack it.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                   if k in state_dict and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatch(es): {few(wrong_shape)}")
        raise CheckpointMismatch(f"{checkpoint} does not fit the {role} model: {'; '.join(parts)}")


@OPTIMIZER_BUILDERS.register_module()
class AKDOptimizerConstructor(DefaultOptimizerConstructor):
    """The default constructor over everything but the teacher (which it never sees)."""

    def __call__(self, model):
        if hasattr(model, "module"):
            model = model.module
        if isinstance(model, AKDDistiller):
            model = nn.ModuleDict({name: child for name, child in model.named_children() if name != "teacher"})
        return super().__call__(model)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class _AtomicCheckpoints:
    """Checkpoints written atomically: a killed run leaves either the previous checkpoint or the new
    one, never a truncated file; ``latest.pth`` is swapped likewise. Mixed into mmcv's runners."""

    checkpoint_template = "{}.pth"

    def checkpoint_number(self) -> int:
        raise NotImplementedError

    def save_checkpoint(self, out_dir, filename_tmpl=None, *, create_symlink=True, **kwargs):
        filename = (filename_tmpl or self.checkpoint_template).format(self.checkpoint_number())
        partial = f"{filename}.partial-{os.getpid()}"
        super().save_checkpoint(out_dir, filename_tmpl=partial, create_symlink=False, **kwargs)
        _fsync(osp.join(out_dir, partial))
        os.replace(osp.join(out_dir, partial), osp.join(out_dir, filename))
        if create_symlink:
            link, tmp_link = osp.join(out_dir, "latest.pth"), osp.join(out_dir, f".latest.pth.{os.getpid()}")
            if osp.lexists(tmp_link):
                os.remove(tmp_link)
            os.symlink(filename, tmp_link)
            os.replace(tmp_link, link)


@RUNNERS.register_module()
class AKDEpochBasedRunner(_AtomicCheckpoints, EpochBasedRunner):
    checkpoint_template = "epoch_{}.pth"

    def checkpoint_number(self) -> int:
        return self.epoch + 1


@RUNNERS.register_module()
class AKDIterBasedRunner(_AtomicCheckpoints, IterBasedRunner):
    checkpoint_template = "iter_{}.pth"

    def checkpoint_number(self) -> int:
        return self.iter + 1


@HOOKS.register_module()
class RichProgressHook(Hook):
    """Progress over all training iterations with ETA and the current losses (rank 0): a live bar
    on a terminal; where the output goes to a file (a Slurm log, CI), one line per epoch, or per
    tenth of the run for iteration-based runs."""

    def __init__(self, max_losses: int = 4):
        self.max_losses = max_losses
        self.progress = None
        self.console = None

    @staticmethod
    def _stage(runner) -> str:
        return f"epoch {runner.epoch + 1}" if isinstance(runner, EpochBasedRunner) else "iterations"

    def before_run(self, runner):
        if get_dist_info()[0] != 0:
            return
        from rich.progress import TextColumn

        from akd_cli.mm.console import progress, progress_console

        self.console = progress_console()
        if not self.console.is_terminal:
            return
        self.progress = progress(TextColumn("[bold]train[/] {task.fields[stage]}"), TextColumn("{task.fields[losses]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=runner.max_iters, completed=runner.iter,
                                           stage=self._stage(runner), losses="")

    def _losses(self, runner) -> str:
        log_vars = (runner.outputs or {}).get("log_vars", {})
        shown = [k for k in log_vars if k == "loss" or k.startswith(("loss_akd", "loss_token"))]
        shown += [k for k in log_vars if k.startswith("loss") and k not in shown][: max(self.max_losses - len(shown), 0)]
        return " ".join(f"{k.replace('loss_', '')}={log_vars[k]:.4g}" for k in shown)

    def _print_line(self, runner, done: int):
        where = (f"epoch {runner.epoch + 1}/{runner.max_epochs}: " if isinstance(runner, EpochBasedRunner) else "")
        self.console.print(f"train {where}iteration {done}/{runner.max_iters} {self._losses(runner)}",
                           highlight=False, soft_wrap=True)

    def after_train_iter(self, runner):
        if self.progress is not None:
            self.progress.update(self.task, completed=runner.iter + 1, stage=self._stage(runner),
                                 losses=self._losses(runner))
        elif self.console is not None and not isinstance(runner, EpochBasedRunner):
            done, every = runner.iter + 1, max(1, runner.max_iters // 10)
            if done % every == 0 or done == runner.max_iters:
                self._print_line(runner, done)

    def after_train_epoch(self, runner):
        if self.console is not None and self.progress is None:
            self._print_line(runner, runner.iter)

    def after_run(self, runner):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

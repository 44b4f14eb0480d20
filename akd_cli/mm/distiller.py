"""The distiller: a trainable student beside a frozen teacher, registered as mmdet's ``AKDDistiller``.

Named module outputs of both are recorded (``akd_cli.mm.recorder``) and distilled with the AKD core's
``AKDLoss``; at test time the distiller is the student alone. Generated configs import this module
through ``custom_imports``, so mmdet's own tools run them too.
"""
from __future__ import annotations

import math
import os
import os.path as osp
from typing import List, Optional, Sequence

from akd_cli.mm import compat

compat.apply()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from mmdet.models import DETECTORS, build_detector  # noqa: E402
from mmdet.models.detectors.base import BaseDetector  # noqa: E402

from akd_cli.core import AKDLoss  # noqa: E402
from akd_cli.errors import UserError  # noqa: E402
from akd_cli.mm.checkpoints import cached_download, load_checkpoint_file, load_weights  # noqa: E402
from akd_cli.mm.recorder import FeatureRecorder  # noqa: E402

BACKBONE_ONLY_PREFIXES = ("backbone", "neck")


def build_akd_loss(method: str, channels: List[int], avatars: dict, options: dict) -> AKDLoss:
    options = dict(options)
    token_file = options.get("token_file")
    if token_file:  # read once here for a one-line error on a missing, corrupt or unsafe file
        try:
            local = cached_download(token_file) if "://" in token_file else os.path.expanduser(token_file)
        except OSError as exc:  # urllib's errors are OSErrors: no network, 404, refused
            raise UserError(f"cannot download the MasKD token file {token_file}: {exc}") from None
        if not osp.isfile(local):
            raise UserError(f"MasKD token file not found: {token_file}")
        load_checkpoint_file(local, map_location="cpu")
        options["token_file"] = local
    try:
        return AKDLoss(base=method, channels=channels, num_levels=len(channels), **avatars, **options)
    except ValueError as exc:  # options of the preset or --cfg-options: the user's input
        raise UserError(str(exc)) from None


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
        avatars: ``num_avatars``, ``drop_rate``, ``uncertainty``, ``weighting``, ``perturbation``,
            ``sigma_momentum`` (AKDLoss's arguments).
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
            self.akd_losses[spec["name"]] = build_akd_loss(method, channels, avatars, options or {})
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
        with self.student_recorder:
            losses = self.student.forward_train(img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore, **kwargs)
        with self.teacher_recorder, torch.no_grad():
            if self._teacher_features_only:
                self.teacher.extract_feat(img)
            else:
                self.teacher.forward_dummy(img)
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

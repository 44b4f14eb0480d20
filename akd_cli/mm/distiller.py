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
from akd_cli.core.head_losses import build_head_loss  # noqa: E402
from akd_cli.mm.recorder import FeatureRecorder, InputRecorder, find_module  # noqa: E402

BACKBONE_ONLY_PREFIXES = ("backbone", "neck")


def modules_of(names) -> List[str]:
    """A feature is one module's outputs or the outputs of a list of modules (one per level)."""
    return [names] if isinstance(names, str) else list(names)


def _roi_head_of(extractor: str) -> str:
    """The bbox head an mmdet RoI extractor feeds (StandardRoIHead's and CascadeRoIHead's naming)."""
    return extractor.replace("bbox_roi_extractor", "bbox_head")


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
            paths), ``channels`` (teacher channels per level), optional ``student_channels``, and
            ``align`` (a trained 1x1 conv per level even where the channels agree, as the recipes'
            ``align_module``).
        method: base loss (``cwd``, ``mgd``, ...); ``options``: its keyword arguments.
        avatars: ``num_avatars``, ``drop_rate``, ``uncertainty``, ``weighting``, ``perturbation``,
            ``sigma_momentum`` (AKDLoss's arguments).
        heads: terms on head outputs: ``name``, ``student``, ``teacher`` (module paths), ``loss``
            (``l1``, ``smooth_l1``, ``dist``), ``weight``, ``options``, and optionally
            ``student_inputs`` (``student``, ``teacher``, ``indices``): the teacher module is called
            with the student module's inputs at those positions (the student's RoIs).
        init_from_teacher: student module prefixes whose weights start as the teacher's.
        origin: where the settings came from (a preset file), named in errors about them.
    """

    def __init__(self, student: dict, teacher: Optional[dict] = None, teacher_checkpoint: Optional[str] = None,
                 distill: Sequence[dict] = (), method: str = "cwd", options: Optional[dict] = None,
                 avatars: Optional[dict] = None, heads: Sequence[dict] = (), init_from_teacher: Sequence[str] = (),
                 origin: Optional[str] = None, train_cfg=None, test_cfg=None, pretrained=None, init_cfg=None):
        super().__init__(init_cfg)
        self.student = build_detector(student)
        self.teacher = build_detector(teacher) if teacher is not None else None
        self.teacher_checkpoint = teacher_checkpoint
        self.method = method
        self.origin = origin
        self.distill = [dict(d) for d in distill] if self.teacher is not None else []
        self.heads = [dict(h) for h in heads] if self.teacher is not None else []
        self.init_from_teacher = list(init_from_teacher) if self.teacher is not None else []
        avatars = dict(avatars or {})
        self.align = nn.ModuleDict()
        self.akd_losses = nn.ModuleDict()
        for spec in self.distill:
            channels = list(spec["channels"])
            student_channels = list(spec.get("student_channels") or channels)
            if student_channels != channels or spec.get("align"):
                self.align[spec["name"]] = nn.ModuleList(
                    nn.Conv2d(s, t, kernel_size=1) for s, t in zip(student_channels, channels))
            self.akd_losses[spec["name"]] = build_akd_loss(method, channels, avatars, options or {})
        self.head_losses = nn.ModuleDict()
        for i, spec in enumerate(self.heads):
            try:
                self.head_losses[spec["name"]] = build_head_loss(spec["loss"], weight=spec.get("weight", 1.0),
                                                                 **dict(spec.get("options") or {}))
            except ValueError as exc:
                raise UserError(f"{self._where(f'distill.heads[{i}]')}: {exc}") from None
        if self.teacher is not None:
            self.teacher.eval()
            for param in self.teacher.parameters():
                param.requires_grad_(False)
        where_s = {m: self._where(f"distill.features[{i}].student") for i, d in enumerate(self.distill)
                   for m in modules_of(d["student"])}
        where_t = {m: self._where(f"distill.features[{i}].teacher") for i, d in enumerate(self.distill)
                   for m in modules_of(d["teacher"])}
        where_s.update({h["student"]: self._where(f"distill.heads[{i}].student") for i, h in enumerate(self.heads)})
        where_t.update({h["teacher"]: self._where(f"distill.heads[{i}].teacher") for i, h in enumerate(self.heads)})
        recorded = self.distill + self.heads
        self.student_recorder = FeatureRecorder(self.student, [m for d in recorded for m in modules_of(d["student"])],
                                                "student", where_s)
        self.teacher_recorder = (FeatureRecorder(self.teacher, [m for d in recorded for m in modules_of(d["teacher"])],
                                                 "teacher", where_t) if recorded else None)
        # Teacher RoI heads run on the student's RoIs: teacher RoI extractor -> (student module, argument indices)
        self._fed = {h["student_inputs"]["teacher"]: (h["student_inputs"]["student"], h["student_inputs"]["indices"])
                     for h in self.heads if h.get("student_inputs")}
        where_in = {h["student_inputs"]["student"]: self._where(f"distill.heads[{i}].student_inputs")
                    for i, h in enumerate(self.heads) if h.get("student_inputs")}
        self.student_inputs = InputRecorder(self.student, {s: idx for s, idx in self._fed.values()}, "student", where_in)
        for i, h in enumerate(self.heads):
            if h["teacher"].startswith("roi_head.") and not h.get("student_inputs"):
                raise UserError(f"{self._where(f'distill.heads[{i}]')}: the teacher's RoI head needs RoIs: give "
                                "student_inputs (the student's RoI extractor, its RoIs' argument index)")
        for extractor in self._fed:
            find_module(self.teacher, extractor, "teacher", where_in[self._fed[extractor][0]])
            find_module(self.teacher, _roi_head_of(extractor), "teacher", where_in[self._fed[extractor][0]])
        self._teacher_parts = {m.split(".")[0] for d in recorded for m in modules_of(d["teacher"])}
        for i, prefix in enumerate(self.init_from_teacher):
            for role, model in (("student", self.student), ("teacher", self.teacher)):
                find_module(model, prefix, role, self._where(f"distill.init_from_teacher[{i}]"))

    def _where(self, field: str) -> str:
        return f"{self.origin}: {field}" if self.origin else field

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
            self._inherit_from_teacher()

    def _inherit_from_teacher(self) -> None:
        """Student modules that start as the teacher's (the recipes' ``init_cfg`` with a prefix)."""
        teacher_state, student_state = self.teacher.state_dict(), self.student.state_dict()
        for i, prefix in enumerate(self.init_from_teacher):
            inherited = {k: v for k, v in teacher_state.items() if k.startswith(prefix + ".")}
            if not inherited:
                raise UserError(f"{self._where(f'distill.init_from_teacher[{i}]')}: the teacher checkpoint "
                                f"{self.teacher_checkpoint} has no weights under {prefix!r} for the student to inherit")
            own = {k for k in student_state if k.startswith(prefix + ".")}
            if set(inherited) != own or any(student_state[k].shape != v.shape for k, v in inherited.items()):
                raise UserError(f"{self._where(f'distill.init_from_teacher[{i}]')}: the student's {prefix!r} "
                                f"does not have the teacher's shape, so it cannot start from the teacher's weights")
            self.student.load_state_dict(inherited, strict=False)

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
        if not self.distill and not self.heads:
            return self.student.forward_train(img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore, **kwargs)
        with self.student_recorder, self.student_inputs:
            losses = self.student.forward_train(img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore, **kwargs)
        # The teacher after the student: the student's head loss reads from the GPU (mmdet counts
        # its positives), so the GPU is still running the teacher's forward when the distillation
        # loss below is queued, and that loss's host work (it reads from the GPU once, at its end;
        # AKDLoss.per_level) overlaps it instead of running with the GPU idle.
        with self.teacher_recorder, torch.no_grad():
            self._teacher_forward(img)
        # FGD scales each image's boxes by that image's own shape before padding, as FGD does
        context = ({"gt_bboxes": gt_bboxes, "img_shape": [tuple(m["img_shape"][:2]) for m in img_metas]}
                   if self.method == "fgd" else {})
        for spec in self.distill:
            name = spec["name"]
            student_feats = self.recorded(self.student_recorder, spec, "student")
            teacher_feats = self.recorded(self.teacher_recorder, spec, "teacher")
            if len(student_feats) != len(spec["channels"]) or len(teacher_feats) != len(spec["channels"]):
                raise ValueError(f"feature {name!r}: the config declares {len(spec['channels'])} level(s), "
                                 f"recorded {len(student_feats)} from student module {spec['student']!r} and "
                                 f"{len(teacher_feats)} from teacher module {spec['teacher']!r}")
            if name in self.align:
                student_feats = [conv(f) for conv, f in zip(self.align[name], student_feats)]
            akd = self.akd_losses[name]
            per_level = akd.per_level(student_feats, teacher_feats, **context)
            losses[f"loss_akd_{self.method}_{name}"] = torch.stack(per_level).sum()
            # Logged, not optimised (mmdet sums only the keys holding "loss"): each level's term and
            # the paper's running sigma (its mean over channels), for the logs, TensorBoard and `akd plot`.
            for i, term in enumerate(per_level if len(per_level) > 1 else []):
                losses[f"akd_{name}_l{i}"] = term.detach()
            for i in range(len(per_level)):
                sigma = akd.running_sigma(i)
                if sigma is not None:
                    losses[f"sigma_{name}_l{i}"] = sigma.detach().mean()
        for spec in self.heads:
            student_outs = self.student_recorder.levels(spec["student"])
            teacher_outs = self.teacher_recorder.levels(spec["teacher"])
            if len(student_outs) != len(teacher_outs) or not student_outs:
                raise ValueError(f"head term {spec['name']!r}: recorded {len(student_outs)} output(s) of student module "
                                 f"{spec['student']!r} and {len(teacher_outs)} of teacher module {spec['teacher']!r}")
            term = self.head_losses[spec["name"]]
            # one term per call (per level of a shared head), summed as mmdet sums MMRazor's per-output losses
            losses[f"loss_kd_{spec['name']}"] = sum(term(s, t) for s, t in zip(student_outs, teacher_outs))
        return losses

    @staticmethod
    def recorded(recorder, spec: dict, role: str) -> list:
        """A feature's levels: the outputs of its module(s), in order, as ``levels`` selects them."""
        feats = [f for module in modules_of(spec[role]) for f in recorder.levels(module)]
        levels = spec.get("levels")
        return feats if levels is None else [feats[i] for i in levels if i < len(feats)]

    def _teacher_forward(self, img) -> None:
        """The teacher's parts whose outputs are distilled, and no more: its features; its dense
        head on them; its RoI heads on the student's RoIs (the teacher's RoI extractor fed the
        student's, as MMRazor's ``modules_with_student_inputs``, so both heads see the same boxes)."""
        parts = self._teacher_parts
        if not parts <= set(BACKBONE_ONLY_PREFIXES) | {"bbox_head", "rpn_head", "roi_head"}:
            self.teacher.forward_dummy(img)  # another architecture: run it whole
            return
        x = self.teacher.extract_feat(img)
        if "bbox_head" in parts:
            self.teacher.bbox_head(x)
        if "rpn_head" in parts:
            self.teacher.rpn_head(x)
        modules = dict(self.teacher.named_modules())
        for extractor_name, (student_name, indices) in self._fed.items():
            calls = self.student_inputs.calls.get(student_name, [])
            extractor, head = modules[extractor_name], modules[_roi_head_of(extractor_name)]
            for recorded in calls:
                args = [x[:extractor.num_inputs], None]
                for position, value in zip(indices, recorded):
                    args[position] = value
                feats = extractor(*args)
                shared = getattr(self.teacher.roi_head, "shared_head", None)
                head(shared(feats) if shared is not None else feats)

    def train_step(self, data, optimizer):
        outputs = super().train_step(data, optimizer)
        if not math.isfinite(outputs["log_vars"]["loss"]):
            bad = [k for k, v in outputs["log_vars"].items() if not math.isfinite(v)]
            raise FloatingPointError(f"non-finite loss ({', '.join(bad)}): stopping instead of training on; "
                                     "lower the learning rate or the distillation weight, or check the data")
        return outputs

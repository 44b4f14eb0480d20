"""MasKD's first stage on mmdet: learn receptive tokens on the frozen teacher.

``ReceptiveTokenLearner`` (DETECTORS) wraps a detector whose weights never change. A forward hook
replaces the outputs of one of its modules (the FPN neck) by the token-masked features
(``akd_cli.core.tokens.ReceptiveTokens``); the detector's own training loss on those features, plus
the masks' Dice overlap, trains the tokens alone. ``akd train --learn-tokens`` runs it like any
other akd run (workers, progress, resume) and exports WORK_DIR/tokens.pth, which the MasKD base
loss reads through ``token_file``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from akd_cli.mm import compat

compat.apply()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from mmdet.models import DETECTORS, build_detector  # noqa: E402
from mmdet.models.detectors.base import BaseDetector  # noqa: E402

from akd_cli.core.tokens import ReceptiveTokens  # noqa: E402
from akd_cli.mm.checkpoints import load_checkpoint_file, load_weights, without_ddp_prefix  # noqa: E402
from akd_cli.mm.recorder import find_module  # noqa: E402

TOKEN_PREFIX = "mask_modules."


@DETECTORS.register_module()
class ReceptiveTokenLearner(BaseDetector):
    """Receptive tokens learnt on a frozen detector.

    Args:
        detector: the teacher's mmdet model config; ``checkpoint``: its weights (required).
        module: the module whose outputs (one tensor per level) are masked, e.g. ``neck``.
        channels: channels per level; ``num_tokens``, ``weight_tokens``: as in the MasKD base loss.
        overlap_weight: weight of the masks' Dice overlap in the loss (MasKD: 1).
    """

    def __init__(self, detector: dict, checkpoint: Optional[str] = None, module: str = "neck",
                 channels: Sequence[int] = (), num_tokens: int = 6, weight_tokens: bool = True,
                 overlap_weight: float = 1.0, train_cfg=None, test_cfg=None, pretrained=None, init_cfg=None):
        super().__init__(init_cfg)
        self.detector = build_detector(detector)
        self.checkpoint = checkpoint
        self.module = module
        self.overlap_weight = overlap_weight
        self.detector.requires_grad_(False)
        # Named as in MasKD's token files: the learnt state exports under the same keys.
        self.mask_modules = nn.ModuleList(ReceptiveTokens(c, num_tokens, weighted=weight_tokens) for c in channels)
        find_module(self.detector, module, "teacher").register_forward_hook(self._mask_outputs)
        self._overlaps: List[torch.Tensor] = []

    def _mask_outputs(self, module, inputs, outputs):
        levels = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if len(levels) != len(self.mask_modules):
            raise ValueError(f"module {self.module!r} gave {len(levels)} level(s); the config declares "
                             f"{len(self.mask_modules)}")
        masked = []
        for tokens, level in zip(self.mask_modules, levels):
            features, overlap = tokens(level)
            masked.append(features)
            self._overlaps.append(overlap)
        return tuple(masked) if isinstance(outputs, (tuple, list)) else masked[0]

    @property
    def CLASSES(self):  # noqa: N802 (mmdet's attribute name)
        return getattr(self.detector, "CLASSES", None)

    @CLASSES.setter
    def CLASSES(self, value):  # noqa: N802
        self.detector.CLASSES = value

    def init_weights(self):
        # The tokens keep their own initialisation; the detector is loaded, never initialised.
        if not self.checkpoint:
            raise ValueError("token learning needs the teacher's checkpoint")
        load_weights(self.detector, self.checkpoint, "teacher")

    def train(self, mode: bool = True):
        # The detector's training-mode forward is what yields its loss (some heads return other
        # outputs in eval mode); only its normalisation statistics are frozen, as in MasKD.
        super().train(mode)
        for module in self.detector.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
        return self

    def forward_train(self, img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore=None, **kwargs):
        self._overlaps = []
        losses = self.detector.forward_train(img, img_metas, gt_bboxes, gt_labels, gt_bboxes_ignore, **kwargs)
        losses["loss_token_overlap"] = torch.stack(self._overlaps).sum() * self.overlap_weight
        self._overlaps = []
        return losses

    def extract_feat(self, img):
        return self.detector.extract_feat(img)

    def simple_test(self, img, img_metas, **kwargs):
        return self.detector.simple_test(img, img_metas, **kwargs)

    def aug_test(self, imgs, img_metas, **kwargs):
        return self.detector.aug_test(imgs, img_metas, **kwargs)


def export_tokens(full_checkpoint: str, out: str) -> str:
    """Write the tokens of a token-learning checkpoint as a token file (MasKD's released layout)."""
    from akd_cli.mm.checkpoints import atomic_torch_save

    full_checkpoint = os.path.realpath(full_checkpoint)
    state = load_checkpoint_file(full_checkpoint, map_location="cpu")
    tokens = without_ddp_prefix(state["state_dict"])
    tokens = {k: v for k, v in tokens.items() if k.startswith(TOKEN_PREFIX)}
    meta = {k: v for k, v in state.get("meta", {}).items() if k in ("akd_version", "iter", "time")}
    meta["exported_from"] = os.path.basename(full_checkpoint)
    return atomic_torch_save({"meta": meta, "state_dict": tokens}, out)

"""Distillation terms on head outputs (logits, box regressions), in pure torch.

The recipes behind the paper's rows add them beside the feature loss (see
``../shared/reference/ORIGINAL-RELEASE.md``, section 3): an L1 or smooth-L1 term on a regression
branch (RetinaNet's ``retina_reg``, RepPoints' point offsets, a Faster R-CNN ``fc_reg`` on the
student's RoIs) and DIST on the RoI classifier's logits. Each is mean-reduced over its elements as
mmdet's ``L1Loss`` / ``SmoothL1Loss`` are, times its weight; a module called once per level gives
one term per level, and the terms are summed (MMRazor's per-output losses, added by mmdet).
"""
from __future__ import annotations

from typing import Dict, Type

import torch
import torch.nn as nn

from akd_cli.core.precision import float32_reductions
from akd_cli.names import HEAD_LOSSES


class HeadLoss(nn.Module):
    def __init__(self, weight: float = 1.0):
        super().__init__()
        if weight < 0:
            raise ValueError(f"head loss weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"head outputs differ in shape: student {tuple(student.shape)}, "
                             f"teacher {tuple(teacher.shape)}")
        with float32_reductions(student):
            return self.weight * self.term(student.float(), teacher.detach().float())


class L1HeadLoss(HeadLoss):
    """mean |S - T| (mmdet's L1Loss, reduction 'mean')."""

    def term(self, student, teacher):
        return (student - teacher).abs().mean()


class SmoothL1HeadLoss(HeadLoss):
    """mean smooth-L1(S - T) with threshold ``beta`` (mmdet's SmoothL1Loss, reduction 'mean')."""

    def __init__(self, weight: float = 1.0, beta: float = 1.0):
        super().__init__(weight)
        if beta <= 0:
            raise ValueError(f"smooth_l1: beta must be > 0, got {beta}")
        self.beta = float(beta)

    def term(self, student, teacher):
        diff = (student - teacher).abs()
        return torch.where(diff < self.beta, 0.5 * diff * diff / self.beta, diff - 0.5 * self.beta).mean()


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DISTHeadLoss(HeadLoss):
    """DIST (Huang et al., 2022) on logits: beta * (1 - mean inter-class Pearson correlation of the
    class probabilities, per sample) + gamma * (1 - mean intra-class correlation, per class over the
    samples); probabilities by softmax, or sigmoid with ``use_sigmoid``. 4-D logits (N x K x H x W)
    count each position as a sample. As hunto/MasKD:mmrazor/mmrazor/models/losses/dist_kd.py."""

    def __init__(self, weight: float = 1.0, beta: float = 1.0, gamma: float = 1.0, use_sigmoid: bool = False):
        super().__init__(weight)
        self.beta, self.gamma, self.use_sigmoid = float(beta), float(gamma), use_sigmoid

    def term(self, student, teacher):
        if student.dim() == 4:
            classes = student.shape[1]
            student = student.transpose(1, 3).reshape(-1, classes)
            teacher = teacher.transpose(1, 3).reshape(-1, classes)
        if student.dim() != 2:
            raise ValueError(f"dist takes N x K logits (or N x K x H x W), got {tuple(student.shape)}")
        to_probs = torch.sigmoid if self.use_sigmoid else (lambda x: x.softmax(dim=1))
        y_s, y_t = to_probs(student), to_probs(teacher)
        inter = 1 - _pearson_rows(y_s, y_t).mean()
        intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
        return self.beta * inter + self.gamma * intra


HEAD_LOSS_CLASSES: Dict[str, Type[HeadLoss]] = {"l1": L1HeadLoss, "smooth_l1": SmoothL1HeadLoss, "dist": DISTHeadLoss}


def build_head_loss(kind: str, **options) -> HeadLoss:
    if kind not in HEAD_LOSS_CLASSES:
        raise ValueError(f"unknown head loss {kind!r}; expected one of {', '.join(HEAD_LOSSES)}")
    try:
        return HEAD_LOSS_CLASSES[kind](**options)
    except TypeError as exc:
        import inspect

        accepted = [p for p in inspect.signature(HEAD_LOSS_CLASSES[kind].__init__).parameters if p != "self"]
        raise ValueError(f"{kind}: {exc}; accepted options: {', '.join(accepted)}") from None

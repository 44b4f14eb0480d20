"""AKDLoss: any base feature-distillation loss, taught by Avatars of the teacher."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from akd_cli.core.avatars import PERTURBATIONS, make_avatar
from akd_cli.core.losses import BASE_LOSSES, build_base_losses
from akd_cli.core.uncertainty import UNCERTAINTY_MODES, AvatarWeigher, standardise

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


class AKDLoss(nn.Module):
    """Avatar Knowledge Distillation around a base loss.

    >>> loss_fn = AKDLoss(base="cwd", num_avatars=2, drop_rate=0.1, uncertainty="variance", tau=1.0)
    >>> loss = loss_fn(student_feats, teacher_feats)   # tensors or lists of N x C x H x W tensors

    For each level, ``num_avatars`` Avatars are drawn from the (detached) teacher feature, each
    weighted per image by the uncertainty factor (see ``akd_cli.core.uncertainty``), and the base
    loss is taken between the student and the weighted Avatars. ``num_avatars=0`` is the plain base
    loss between student and teacher: classic KD and AKD run the same code. ``num_avatars=1`` is the
    base loss on one Avatar, whose factor is 1 in every mode (the paper's setting).

    Args:
        base: one of ``cwd``, ``mgd``, ``maskd``, ``fgd``, ``pkd``, ``mse``.
        num_avatars: Avatars per level per call (0: no Avatars).
        drop_rate: perturbation strength in [0, 1): the dropout probability, or the relative noise
            std for ``perturbation="noise"``.
        uncertainty: ``variance``, ``bn`` or ``none``.
        perturbation: ``dropout`` (element-wise), ``channel`` or ``noise``.
        channels: channels per level, for base losses with parameters (MGD, MasKD, FGD); an int
            with ``num_levels``, or a list.
        fused: combine Avatars before the student-side term where the base loss allows it (same
            value as the per-Avatar loop, memory independent of ``num_avatars``).
        **base_kwargs: the base loss's own options (``tau``, ``loss_weight``, ``alpha_mgd``, ...).
    """

    def __init__(self, base: str = "cwd", num_avatars: int = 1, drop_rate: float = 0.1,
                 uncertainty: str = "variance", perturbation: str = "dropout",
                 channels: Optional[Union[int, Sequence[int]]] = None, num_levels: Optional[int] = None,
                 fused: bool = True, **base_kwargs):
        super().__init__()
        if isinstance(num_avatars, bool) or not isinstance(num_avatars, int) or num_avatars < 0:
            raise ValueError(f"num_avatars must be an integer >= 0, got {num_avatars!r}")
        if not (0.0 <= float(drop_rate) < 1.0):
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if uncertainty not in UNCERTAINTY_MODES:
            raise ValueError(f"unknown uncertainty {uncertainty!r}; expected one of {UNCERTAINTY_MODES}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {perturbation!r}; expected one of {PERTURBATIONS}")
        if base not in BASE_LOSSES:
            raise ValueError(f"unknown base loss {base!r}; expected one of {sorted(BASE_LOSSES)}")
        self.base_name = base
        self.num_avatars = num_avatars
        self.drop_rate = float(drop_rate)
        self.uncertainty = uncertainty
        self.perturbation = perturbation
        self.fused = fused
        self.base_losses = build_base_losses(base, num_levels, channels, **base_kwargs)

    def extra_repr(self) -> str:
        return (f"base={self.base_name}, num_avatars={self.num_avatars}, drop_rate={self.drop_rate}, "
                f"uncertainty={self.uncertainty}, perturbation={self.perturbation}, fused={self.fused}")

    def forward(self, student: Features, teacher: Features, **context) -> torch.Tensor:
        """Sum over levels of the (Avatar-weighted) base loss. ``context`` reaches the base loss
        (FGD's ``gt_bboxes`` and ``img_shape``)."""
        return torch.stack(self.per_level(student, teacher, **context)).sum()

    def per_level(self, student: Features, teacher: Features, **context) -> List[torch.Tensor]:
        students, teachers = self._validate(student, teacher)
        return [self._level_loss(i, s, t.detach(), **context)
                for i, (s, t) in enumerate(zip(students, teachers))]

    # ----------------------------------------------------------------------------------------
    def _base_for(self, level: int):
        return self.base_losses[level if len(self.base_losses) > 1 else 0]

    def _level_loss(self, level: int, student: torch.Tensor, teacher: torch.Tensor, **context):
        base = self._base_for(level)
        if self.num_avatars == 0:
            return base(student, teacher, **context)
        if self.uncertainty == "bn":
            student = standardise(student)
        prepared = base.prepare_student(student, **context)
        if self.num_avatars == 1:
            # A lone Avatar's factor normalises to one in every mode: its loss is the base loss on
            # it, with no uncertainty pass and no accumulator (the paper's setting, at its least cost).
            return base.per_image(prepared, self._draw_avatar(teacher), **context).sum()
        fuse = self.fused and base.fusable
        # Weights and accumulators stay in float32 whatever the features' dtype: the unnormalised
        # weights exceed float16's range (1 / u is ~1e5 on real FPN maps), which under AMP made NaNs.
        total_weight = weighted = weighted_constant = phi_dtype = phi = term = None
        weigher = AvatarWeigher(teacher, self.uncertainty)
        for _ in range(self.num_avatars):
            avatar = self._draw_avatar(teacher)
            weight = weigher(avatar)                                               # N, float32
            if fuse:
                phi, constant = base.target(prepared, avatar, **context)
                phi_dtype = phi.dtype
                per_image = weight.view(-1, *([1] * (phi.dim() - 1)))
                constant = constant * weight.double()
                if weighted is None:  # the teacher side has no gradient: accumulate in place
                    weighted, weighted_constant = phi.float() * per_image, constant
                else:
                    weighted.addcmul_(phi.float(), per_image)
                    weighted_constant += constant
            else:
                term = base.per_image(prepared, avatar, **context).float() * weight
                weighted = term if weighted is None else weighted + term
            total_weight = weight if total_weight is None else total_weight + weight
            # Drop this Avatar's tensors before the next one is drawn: otherwise two Avatars' worth
            # would be alive at once and the peak would depend on num_avatars.
            avatar = phi = term = None
        if fuse:
            phi_bar = weighted.div_(total_weight.view(-1, *([1] * (weighted.dim() - 1)))).to(phi_dtype)
            return base.fused(prepared, phi_bar, weighted_constant / total_weight.double(), **context).sum()
        return (weighted / total_weight).sum()

    def _draw_avatar(self, teacher: torch.Tensor) -> torch.Tensor:
        """A fresh Avatar as the base loss sees it: standardised in ``bn`` mode (whose factor is 1
        whatever the Avatar, so the weigher may see it standardised too)."""
        avatar = make_avatar(teacher, self.perturbation, self.drop_rate)
        return standardise(avatar) if self.uncertainty == "bn" else avatar

    def _validate(self, student: Features, teacher: Features):
        students = [student] if torch.is_tensor(student) else list(student)
        teachers = [teacher] if torch.is_tensor(teacher) else list(teacher)
        if len(students) != len(teachers):
            raise ValueError(f"{len(students)} student level(s) but {len(teachers)} teacher level(s)")
        if not students:
            raise ValueError("no feature levels given")
        if len(self.base_losses) > 1 and len(students) != len(self.base_losses):
            raise ValueError(f"{self.base_name} was built for {len(self.base_losses)} level(s), "
                             f"got {len(students)}")
        for i, (s, t) in enumerate(zip(students, teachers)):
            if not (torch.is_tensor(s) and torch.is_tensor(t)):
                raise ValueError(f"level {i}: features must be tensors, got {type(s).__name__} "
                                 f"and {type(t).__name__}")
            if s.dim() != 4 or s.shape != t.shape:
                raise ValueError(f"level {i}: student shape {tuple(s.shape)} and teacher shape "
                                 f"{tuple(t.shape)} must be equal N x C x H x W")
        # One device sync for all levels; the culprit is searched only when something is wrong.
        finite = torch.stack([torch.isfinite(x).all() for x in students + teachers])
        if not bool(finite.all()):
            for i, (s, t) in enumerate(zip(students, teachers)):
                for role, x in (("student", s), ("teacher", t)):
                    if not bool(torch.isfinite(x).all()):
                        raise ValueError(f"level {i}: {role} feature of shape {tuple(x.shape)} "
                                         "holds non-finite values")
        return students, teachers

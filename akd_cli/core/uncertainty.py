r"""How the Avatars' uncertainty enters the loss: the normalising factor sigma and the weighting of
several Avatars against each other. Two separate choices that compose.

The factor (``uncertainty``):

``paper``: the method as the paper's figure draws it, L = E_x E_k L_distill(a_k / sigma, S / sigma):
the spread sigma of the teacher-Avatar differences divides both the Avatars and the student before
the base loss, for any number of Avatars, one included. What the figure leaves open is decided so:

- Granularity: per channel of each distilled level. The figure draws sigma^2 as a feature-shaped
  block, and the expectations over the Avatars and over the data leave the channel as the natural
  axis (a per-element sigma over a batch of a few images would be mostly noise; a per-channel one
  rescales each channel's contribution, which is what "adjusting Avatars' contribution" can mean
  for a distillation loss that compares channels).
- Estimate: sigma_c^2 = E[(a_k - T)_c^2], the mean over the K Avatars, the batch's images and the
  positions (all ranks of a distributed run together, through one all-reduce of C numbers). The
  expectation over the data E_x is a running estimate of that batch estimate, as BatchNorm keeps
  its statistics: running <- (1 - m) running + m batch, with momentum m (``sigma_momentum``, 0.1 by
  default, BatchNorm's), starting at the first batch's value. It is a buffer of the loss, so it is
  kept in checkpoints and a resumed run continues it. Training uses the running estimate after the
  current batch's update; evaluation (no Avatars are needed there) leaves it unchanged.
- Because sigma needs all of a step's Avatars before the first of them is normalised, the Avatars
  are drawn twice from the same generator state: once for sigma, once for the loss. That keeps the
  memory flat in the number of Avatars (none is stored) at the cost of a second draw.
- Zero channels: sigma^2 + eps, eps = 1e-6 times the level's mean sigma^2 (plus float32's tiny),
  so a channel the teacher never activates is not blown up by a near-zero division.
- No gradient flows through sigma (the teacher side is a constant of the student's optimisation).
- Drop rate 0: the Avatars equal the teacher, sigma is 0 and the formula has no limit (a / sigma
  grows as 1 / sqrt(p) for dropout); akd then applies no factor, so the loss is the base loss on
  the teacher, as for every factor. For dropout of rate p, sigma_c^2 = p / (1 - p) * E[T_c^2]: the
  tests check that closed form.

``release``: what the release's code computes (Gumpest/AvatarKD:mmrazor/models/losses/akd_cwd.py,
akd_mgd.py, akd_maskd.py): the student is standardised per channel with its own batch statistics
(an affine-free BatchNorm2d in training mode, biased variance, eps 1e-5), after MasKD's align conv;
MGD's and MasKD's Avatars are standardised the same way; CWD's Avatar is used raw (the release
standardises the teacher, then ignores it). Defects fixed: every level gets its own channel count
(the release's CWD built BatchNorm2d(2048) for 256-channel FPN levels); no running statistics are
kept (the release's BatchNorm updated them and never used them). FGD, PKD and MSE are not in the
release: akd standardises their Avatars as MGD's and MasKD's. This is the factor that produced the
paper's numbers.

``none``: no factor; the base loss on the Avatars.

The weighting of several Avatars (``weighting``), for either factor:

``mean``: every Avatar counts the same (the expectation E_k of the paper's formula).

``inverse_variance`` (akd's own, not the paper's): per image, the Avatar whose channel statistics
moved less from the teacher's counts more. The statistical difference of Avatar k on image n and
channel c is the shift of the channel's mean in units of the teacher channel's spread,
d[k, n, c] = (mean_hw A_k - mean_hw T) / (std_hw T + eps); u[k, n] = Var_c d[k, n, :] is the
Avatar's uncertainty on that image, and gamma[k, n] = (1 / u[k, n]) / sum_j (1 / u[j, n]) its
weight: the inverse-variance combination of independent noisy estimates. It sums to one per image,
is 1/K for equally uncertain Avatars, and 1 for a single Avatar. It is computed on the raw Avatar
and teacher, before any factor, and carries no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from akd_cli.names import AVATAR_WEIGHTINGS, UNCERTAINTY_MODES

_EPS = 1e-6
_WEIGHT_EPS = 1e-12
RELEASE_BN_EPS = 1e-5


class AvatarWeigher:
    """The unnormalised weights w[n] of the Avatars of one teacher feature (gamma = w / sum_k w).

    The teacher's channel statistics are taken once per level, not once per Avatar. Float32, no
    gradient, whatever the features' dtype.
    """

    def __init__(self, teacher: torch.Tensor, weighting: str):
        if weighting not in AVATAR_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {AVATAR_WEIGHTINGS}")
        self.weighting = weighting
        self.ones = None
        if weighting == "inverse_variance":
            with torch.no_grad():
                self.mean, self.spread = teacher_channel_spread(teacher)
        else:
            self.ones = torch.ones(teacher.shape[0], device=teacher.device, dtype=torch.float32)

    def uncertainty(self, avatar: torch.Tensor) -> torch.Tensor:
        """u[n]: the variance over channels of the standardised channel-mean shift (shape N)."""
        with torch.no_grad():
            return channel_mean_shift_variance(avatar.float().flatten(2).mean(dim=2), self.mean, self.spread)

    def __call__(self, avatar: torch.Tensor) -> torch.Tensor:
        return self.from_channel_means(avatar.float().flatten(2).mean(dim=2)[None])[0]

    def from_channel_means(self, means: torch.Tensor) -> torch.Tensor:
        """The weights of K Avatars at once from their channel means (K x N x C): K x N."""
        if self.ones is not None:
            return self.ones.expand(means.shape[0], -1)
        with torch.no_grad():
            return inverse_variance_weights(means, self.mean, self.spread)


def teacher_channel_spread(teacher: torch.Tensor):
    """The teacher's mean and spread (biased std + eps) per image and channel (N x C each, float32):
    what ``inverse_variance`` measures an Avatar's channel-mean shift against."""
    std, mean = torch.std_mean(teacher.float().flatten(2), dim=2, correction=0)
    return mean, std + _EPS


def channel_mean_shift_variance(means: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """u: Var_c of (mean_hw A - mean_hw T) / spread, from Avatar channel means (... x N x C)."""
    return ((means - mean) / spread).var(dim=-1, unbiased=False)


def inverse_variance_weights(means: torch.Tensor, mean: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """The unnormalised weights 1 / u of K Avatars from their channel means (K x N x C): K x N.
    Plain functions, so the compiled Avatar passes (akd_cli.core.fused) compute them in their graph."""
    return 1.0 / (channel_mean_shift_variance(means.float(), mean, spread) + _WEIGHT_EPS)


def avatar_uncertainty(teacher: torch.Tensor, avatar: torch.Tensor) -> torch.Tensor:
    """u[n] of one Avatar (see AvatarWeigher)."""
    return AvatarWeigher(teacher, "inverse_variance").uncertainty(avatar)


def standardise(x: torch.Tensor, eps: float = RELEASE_BN_EPS) -> torch.Tensor:
    """Affine-free batch normalisation with the tensor's own batch statistics (per channel, biased
    variance): BatchNorm2d(affine=False) in training mode, as the release applies it, through the
    same function (torch's batch norm, without running statistics: the release's were never used).
    One fused kernel each way, where the formula written out took five forward and some ten
    backward (CPU, ResNet-50 FPN shapes: 220 -> 95 ms for the student's five levels, forward and
    backward; equal to 1e-6).

    A channel with one value in the batch (one image, a 1 x 1 map: a small image's coarsest level)
    standardises to 0, as the formula gives; batch norm refuses it in training mode."""
    if x.numel() == x.shape[1]:
        return x - x
    return F.batch_norm(x, None, None, training=True, eps=eps)


def student_under_factor(student: torch.Tensor, scale: Optional[torch.Tensor], uncertainty: str) -> torch.Tensor:
    """The student as the base loss takes it under the factor: times the paper's 1 / sigma
    (``scale``, 1 x C x 1 x 1), standardised for the release's, as it is without a factor."""
    if scale is not None:
        return student * scale
    if uncertainty == "release":
        return standardise(student)
    return student


def squared_difference_per_channel(avatar: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum over images and positions of (a - T)^2, per channel (C, float32, no gradient)."""
    with torch.no_grad():
        return (avatar.float() - teacher.float()).pow(2).sum(dim=(0, 2, 3))


def inverse_sigma(sigma2: torch.Tensor) -> torch.Tensor:
    """1 / sigma per channel from sigma^2, with the zero-channel guard (see the module docstring)."""
    eps = _EPS * sigma2.mean() + torch.finfo(torch.float32).tiny
    return torch.rsqrt(sigma2 + eps)


def update_running(running: torch.Tensor, batch: torch.Tensor, steps: torch.Tensor, momentum: float,
                   apply: Optional[torch.Tensor] = None) -> torch.Tensor:
    """running <- (1 - m) running + m batch, in place; the first step takes the batch value. Chosen
    on the device (no int(steps)): reading the counter would wait for the GPU at every level of
    every step. The same operations as in place, so the values are bit for bit those of before.
    ``apply`` (a 0-d bool tensor) skips the update, again without reading it, where it is False."""
    updated = torch.where(steps == 0, batch, running.mul(1.0 - momentum).add(batch, alpha=momentum))
    if apply is None:
        running.copy_(updated)
        steps += 1
    else:
        running.copy_(torch.where(apply, updated, running))
        steps += apply.long()
    return running


__all__ = ["AVATAR_WEIGHTINGS", "UNCERTAINTY_MODES", "AvatarWeigher", "avatar_uncertainty", "channel_mean_shift_variance",
           "inverse_sigma", "inverse_variance_weights", "squared_difference_per_channel", "standardise",
           "teacher_channel_spread", "update_running"]

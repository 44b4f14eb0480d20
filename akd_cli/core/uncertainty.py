r"""The uncertainty-aware factor: how much each Avatar contributes, per image.

``variance`` (the paper's description, made precise here). For a level with teacher feature T and
Avatars A_1..A_K (each N x C x H x W), the *statistical difference* of Avatar k on image n and
channel c is the shift of the channel's mean, in units of the teacher channel's spread:

    d[k, n, c] = (mean_hw A_k[n, c] - mean_hw T[n, c]) / (std_hw T[n, c] + eps)

Its variance over channels, u[k, n] = Var_c d[k, n, :], is the Avatar's uncertainty on that image:
an Avatar whose perturbation moved the channel statistics about a lot carries a less reliable
picture of the teacher. The factor is the normalised inverse uncertainty

    gamma[k, n] = (1 / (u[k, n] + eps)) / sum_j (1 / (u[j, n] + eps)),

the inverse-variance weighting by which independent noisy estimates are best combined. Why this
form: it is scale-free (the features' magnitude and the drop rate cancel), it needs no temperature
to tune, its weights sum to one per image so the base loss keeps its scale whatever the number of
Avatars, and it degrades gracefully: with one Avatar gamma is 1 (the loss is the base loss on that
Avatar, which is what the original release computes), with equally uncertain Avatars it is the plain
average, and at drop rate 0 (Avatars equal to the teacher, u = 0) every weight is 1/K, so the loss
equals the plain base loss. The factor carries no gradient.

``bn`` (the original release's behaviour, fixed): student and Avatar are standardised per channel
with their own batch statistics (affine-free, no running statistics), and the Avatars are averaged.

``none``: the Avatars are averaged.
"""
from __future__ import annotations

import torch

from akd_cli.names import UNCERTAINTY_MODES

_EPS = 1e-6
_WEIGHT_EPS = 1e-12


class AvatarWeigher:
    """The unnormalised weights w[n] of the Avatars of one teacher feature (gamma = w / sum_k w).

    The teacher's channel statistics are taken once per level, not once per Avatar. Float32, no
    gradient, whatever the features' dtype.
    """

    def __init__(self, teacher: torch.Tensor, mode: str):
        if mode not in UNCERTAINTY_MODES:
            raise ValueError(f"unknown uncertainty mode {mode!r}; expected one of {UNCERTAINTY_MODES}")
        self.mode = mode
        self.ones = None
        if mode == "variance":
            with torch.no_grad():
                std, self.mean = torch.std_mean(teacher.float().flatten(2), dim=2, correction=0)
                self.spread = std + _EPS
        else:
            self.ones = torch.ones(teacher.shape[0], device=teacher.device, dtype=torch.float32)

    def uncertainty(self, avatar: torch.Tensor) -> torch.Tensor:
        """u[n]: the variance over channels of the standardised channel-mean shift (shape N)."""
        with torch.no_grad():
            shift = (avatar.float().flatten(2).mean(dim=2) - self.mean) / self.spread
            return shift.var(dim=1, unbiased=False)

    def __call__(self, avatar: torch.Tensor) -> torch.Tensor:
        if self.ones is not None:
            return self.ones
        return 1.0 / (self.uncertainty(avatar) + _WEIGHT_EPS)


def avatar_uncertainty(teacher: torch.Tensor, avatar: torch.Tensor) -> torch.Tensor:
    """u[n] of one Avatar (see AvatarWeigher)."""
    return AvatarWeigher(teacher, "variance").uncertainty(avatar)


def standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Affine-free batch normalisation with the tensor's own batch statistics (per channel)."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    centred = x - mean
    # in place when no gradient flows (the Avatars): one temporary per Avatar, not two
    return centred.div_(torch.sqrt(var + eps)) if not centred.requires_grad else centred / torch.sqrt(var + eps)

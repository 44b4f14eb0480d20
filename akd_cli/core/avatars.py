"""Avatars: perturbed copies of a teacher feature map, drawn fresh at every call.

All perturbations are unbiased (the expected Avatar is the teacher) and all are the identity at
`drop_rate == 0`. They draw from torch's global generator on the feature's device, so a run is
reproducible under `torch.manual_seed`; given a ``seed`` tensor, dropout masks come instead from
the counter-based generator (``akd_cli.core.counter_rng``) that the fused Avatar passes share.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from akd_cli.core import counter_rng
from akd_cli.names import PERTURBATIONS


def make_avatar(teacher: torch.Tensor, perturbation: str = "dropout", drop_rate: float = 0.1,
                seed: Optional[torch.Tensor] = None, index: int = 0) -> torch.Tensor:
    """One Avatar of an N x C x H x W teacher feature.

    - ``dropout``: element-wise zeroing with probability ``drop_rate``, survivors scaled by
      1 / (1 - drop_rate): the paper's and the original release's perturbation.
    - ``channel``: whole channels of each image zeroed with probability ``drop_rate``, survivors
      scaled likewise.
    - ``noise``: additive Gaussian noise whose standard deviation is ``drop_rate`` times each
      (image, channel)'s own standard deviation over positions.

    ``seed`` (a 0-d int64 tensor, ``counter_rng.draw_seed``) and ``index`` select Avatar ``index`` of
    the counter-based dropout stream: the same call gives the same Avatar, in any pass.
    """
    if drop_rate == 0.0:
        return teacher
    if seed is not None:
        if perturbation != "dropout":
            raise ValueError(f"the counter-based generator draws dropout Avatars, not {perturbation!r}")
        # filled on the device: torch.tensor would be a blocking host-to-GPU copy, i.e. a sync
        keys = counter_rng.avatar_keys(seed, torch.full((), index, device=teacher.device, dtype=torch.int64))
        drop = counter_rng.Drop.of(drop_rate)
        return counter_rng.dropout(teacher, counter_rng.keep_mask(teacher.shape, keys, drop), drop)
    if perturbation == "dropout":
        return F.dropout(teacher, p=drop_rate, training=True)
    if perturbation == "channel":
        keep = torch.empty(teacher.shape[:2] + (1,) * (teacher.dim() - 2), device=teacher.device,
                           dtype=teacher.dtype).bernoulli_(1.0 - drop_rate)
        return teacher * keep / (1.0 - drop_rate)
    if perturbation == "noise":
        scale = teacher.flatten(2).std(dim=2, unbiased=False)[..., None, None] * drop_rate
        return teacher + torch.randn_like(teacher) * scale
    raise ValueError(f"unknown perturbation {perturbation!r}; expected one of {PERTURBATIONS}")

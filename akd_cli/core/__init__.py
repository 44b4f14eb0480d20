"""The AKD core in pure torch: Avatars, the uncertainty-aware factor and the base losses.

Importable and usable without mmcv or mmdet.
"""
from akd_cli.core.akd import AKDLoss
from akd_cli.core.avatars import PERTURBATIONS, make_avatar
from akd_cli.core.losses import BASE_LOSSES, BaseLoss
from akd_cli.core.uncertainty import AVATAR_WEIGHTINGS, UNCERTAINTY_MODES

__all__ = ["AKDLoss", "AVATAR_WEIGHTINGS", "BASE_LOSSES", "BaseLoss", "PERTURBATIONS", "UNCERTAINTY_MODES",
           "make_avatar"]

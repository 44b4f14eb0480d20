"""Numerics that must hold under mixed precision (``--amp``)."""
import torch


def float32_reductions(x: torch.Tensor):
    """A context in which matrix-product reductions stay in float32. Under autocast, einsum, bmm
    and @ run in float16 whatever their inputs' dtype, so a sum of squares over a feature map
    (~1e7) overflows float16's 65504 and the loss turns NaN."""
    return torch.autocast(device_type=x.device.type, enabled=False)

"""MasKD's receptive tokens (Huang et al., "Masked Distillation with Receptive Tokens", ICLR 2023).

Per feature level, T learnable tokens (T x C) turn a feature map into T soft masks,
m_t = sigmoid(<token_t, x[:, h, w]>), and a small head (conv3x3, global average pool, conv1x1)
weights the tokens per image with a softmax. The tokens are learnt on the frozen teacher first
(its detection loss on the masked features, plus a Dice term that keeps the masks apart), then
kept fixed while the student is distilled through them.

Token files use the layout of MasKD's released token checkpoints: a state dict whose keys hold
``mask_modules.<level>.mask_token`` and ``mask_modules.<level>.prob.{0,2}.{weight,bias}``, so the
released files load as they are and akd's own files load in MasKD's code.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from akd_cli.core.precision import float32_reductions

LEVEL_KEY = re.compile(r"(?:^|\.)mask_modules\.(\d+)\.(.+)$")


class ReceptiveTokens(nn.Module):
    """The tokens of one feature level, and (``weighted``) the head that weights them per image."""

    def __init__(self, channels: int, num_tokens: int = 6, weighted: bool = True):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"maskd: num_tokens must be >= 1, got {num_tokens}")
        # Parameter names follow the released token files (see the module docstring).
        self.mask_token = nn.Parameter(torch.randn(num_tokens, channels) * 0.01)
        self.prob = None
        if weighted:
            self.prob = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                      nn.Conv2d(channels, num_tokens, 1))
            for conv in (self.prob[0], self.prob[2]):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    @property
    def num_tokens(self) -> int:
        return self.mask_token.shape[0]

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """N x T x H x W soft masks of a feature map N x C x H x W."""
        return torch.sigmoid(torch.einsum("tc,nchw->nthw", self.mask_token.to(x.dtype), x))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """N x T token weights summing to one per image (uniform without the weighting head)."""
        return self.weights_of_windows(self.windows(x), x.shape[-2] * x.shape[-1]).to(x.dtype)

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """What the weights need of x (N x C x H x W): its ``window_sums``, or nothing (N x 0) when
        the tokens are weighted uniformly."""
        return window_sums(x) if self.prob is not None else x.new_zeros(x.shape[0], 0)

    def windows_of_sums(self, rows: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``windows`` of maps given by their sums over rows and their first and last rows (each
        M x C x W; ``windows_of_sums``)."""
        return windows_of_sums(rows, first, last) if self.prob is not None else rows.new_zeros(rows.shape[0], 0)

    def weights_of_windows(self, windows: torch.Tensor, positions: int) -> torch.Tensor:
        """The token weights (M x T) of M maps of ``positions`` positions each, from their 3x3 windows'
        sums (``window_sums``, M x C x 3 x 3): apart from ``weights``, so that several groups of maps
        share one call of the head's products (the fused Avatar passes, one group per Avatar)."""
        if self.prob is None:
            return windows.new_full((windows.shape[0], self.num_tokens), 1.0 / self.num_tokens)
        conv, _, head = self.prob  # self.prob(x) = head(pool(conv(x))), with pool(conv(x)) taken exactly but cheaply
        pooled = mean_of_conv3x3(conv, windows, positions).flatten(1).to(head.weight.dtype)        # M x C
        # head, a 1x1 convolution of 1x1 maps, as the matrix product it is. Called as a convolution,
        # torch's choice of convolution backend read the map count, and compiled (the fused passes)
        # that was a guard M < 16: a recompilation at 16 maps, and a bound on the batch size that
        # made inductor write a persistent reduction over it, which its combo kernels fail on (torch
        # 2.13, pytorch/pytorch#187269; bench/RESULTS.md).
        logits = nn.functional.linear(pooled, head.weight.flatten(1), head.bias)
        return torch.softmax(logits, dim=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The token-learning stage's view of a level: sum_t w_t m_t x, and the masks' Dice overlap."""
        masks = self.masks(x)
        coverage = torch.einsum("nthw,nt->nhw", masks, self.weights(x))
        return x * coverage.unsqueeze(1), dice_overlap(masks)


def window_sums(x: torch.Tensor) -> torch.Tensor:
    """The sums of x (N x C x H x W) over the windows that the 9 taps of a 3x3, padding-1 convolution
    read (N x C x 3 x 3, float32): each tap reads the whole map but one edge row and/or column (zero
    padding), so all nine come from one pass over x."""
    with float32_reductions(x):
        x = x.float()                                                              # FPN sums exceed float16
        return windows_of_sums(x.sum(dim=-2), x[..., 0, :], x[..., -1, :])


def windows_of_sums(rows: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``window_sums`` from a map's sums over rows (N x C x W), its first and its last row: what
    reads the map's elements apart from the rest. The fused Avatar passes take those per Avatar, in
    one pass over the teacher for all, and the rest for all Avatars at once (per Avatar, each step of
    the rest was a kernel launch of its own on a GPU).

    A tap row (what one row of taps reads, summed over rows) is the sums over rows less the last, no
    or the first row; a window, a tap row's sum less its last, no or first column. Taken apart, so
    that no tap row is stored: for K Avatars at once they were K x N x C x 3 x W, a quarter of an FPN
    level's map with 8 Avatars, where each Avatar's in turn had taken a thirty-second."""
    with float32_reductions(rows):
        rows, first, last = rows.float(), first.float(), last.float()

        def taps(of_rows, of_first, of_last):  # N x C x 3: the tap rows' values, from those of rows, first, last
            return torch.stack([of_rows - of_last, of_rows, of_rows - of_first], dim=2)

        sums = taps(rows.sum(dim=-1), first.sum(dim=-1), last.sum(dim=-1))
        return torch.stack([sums - taps(rows[..., -1], first[..., -1], last[..., -1]), sums,
                            sums - taps(rows[..., 0], first[..., 0], last[..., 0])], dim=3)


def mean_of_conv3x3(conv: nn.Conv2d, windows: torch.Tensor, positions: int) -> torch.Tensor:
    """The global average of a 3x3, padding-1 convolution (N x C_out x 1 x 1) of maps of ``positions``
    positions, from their ``window_sums``, without running it.

    The mean of a linear map is the map of the means: nine window sums replace C_out x C_in x 9
    products at every position, so MasKD's token weighting, which runs on every Avatar, costs ~1% of
    the convolution on FPN maps (same value and gradients to float rounding).
    """
    with float32_reductions(windows):
        mean = torch.einsum("ocij,ncij->no", conv.weight.float(), windows.float()) / positions
    if conv.bias is not None:
        mean = mean + conv.bias.float()
    return mean[..., None, None]


def dice_overlap(masks: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean Dice coefficient over the ordered pairs of different masks (N x T x H x W): 0 when the
    masks cover disjoint positions, 1 when they are equal. Minimised to keep the tokens diverse."""
    flat = masks.flatten(2)                                            # N x T x P
    if flat.shape[1] < 2:
        return flat.sum() * 0.0
    with float32_reductions(flat):
        flat = flat.float()
        inner = flat @ flat.transpose(1, 2)                            # N x T x T
    norms = torch.diagonal(inner, dim1=1, dim2=2) + eps                # N x T
    dice = 2.0 * inner / (norms.unsqueeze(2) + norms.unsqueeze(1))
    off_diagonal = ~torch.eye(flat.shape[1], dtype=torch.bool, device=flat.device)
    return dice[:, off_diagonal].mean()


def token_states(state: object, source: str) -> Dict[int, Dict[str, torch.Tensor]]:
    """Per level, the state dict of its ReceptiveTokens found in a loaded token file."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"maskd: {source} holds no state dict of receptive tokens")
    levels: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = LEVEL_KEY.search(str(key))
        if match and torch.is_tensor(value):
            levels.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if not levels:
        raise ValueError(f"maskd: {source} holds no 'mask_modules.<level>.mask_token' entries "
                         "(a token file from 'akd train --learn-tokens' or MasKD's releases)")
    return levels


def load_token_file(path: str) -> Dict[int, Dict[str, torch.Tensor]]:
    return token_states(torch.load(path, map_location="cpu", weights_only=True), path)


def load_into(tokens: ReceptiveTokens, levels: Dict[int, Dict[str, torch.Tensor]], level: int, source: str) -> None:
    if level not in levels:
        raise ValueError(f"maskd: {source} has tokens for level(s) {sorted(levels)}, not for level {level}")
    state = levels[level]
    shape = tuple(state.get("mask_token", torch.empty(0)).shape)
    if shape != tuple(tokens.mask_token.shape):
        raise ValueError(f"maskd: level {level} tokens in {source} have shape {shape}, "
                         f"expected {tuple(tokens.mask_token.shape)} (num_tokens x channels)")
    has_head = any(k.startswith("prob.") for k in state)
    if tokens.prob is not None and not has_head:
        raise ValueError(f"maskd: {source} has no token-weighting head for level {level}; "
                         "set weight_tokens=False to weight the tokens uniformly")
    tokens.load_state_dict(state if tokens.prob is not None else {"mask_token": state["mask_token"]})


def token_file_state(modules: List[ReceptiveTokens], meta: Optional[dict] = None) -> dict:
    """What a token file holds, in the released layout."""
    state = {f"mask_modules.{level}.{k}": v.detach().cpu().clone()
             for level, module in enumerate(modules) for k, v in module.state_dict().items()}
    return {"meta": dict(meta or {}), "state_dict": state}

"""Feature-distillation base losses for one feature level, in pure torch.

Every loss is written per image: ``per_image(prepared_student, teacher) -> (N,)``, whose sum over
the batch is the loss. That lets the uncertainty factor weight Avatars image by image.

Losses that are *linear in a teacher-side term* (``fusable = True``) also split into
``target(prepared_student, teacher) -> (phi, constant)`` (the teacher-side term, and per image the part
of the loss that does not involve the student) and ``fused(prepared_student, phi_bar, constant_bar) -> (N,)``.
The student reaches ``target`` only as a constant (MasKD's student masks), never with a gradient.
Because sum_k g_k L(s, a_k) = fused(s, sum_k g_k phi(a_k), sum_k g_k c(phi(a_k))) whenever the
weights g_k sum to one, any number of Avatars costs one student-side evaluation and one running
teacher-side accumulator: peak memory does not grow with the number of Avatars.

Defaults follow the methods' own public COCO configurations (see the README).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from akd_cli.core.precision import float32_reductions


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of a * b, in float32, without materialising the product (a batched
    matrix product): per-Avatar temporaries would otherwise make peak memory grow with Avatars."""
    with float32_reductions(a):
        return torch.einsum("...i,...i->...", a.float(), b.float())


class BaseLoss(nn.Module):
    """One level of a feature-distillation loss between student and teacher (N x C x H x W)."""

    fusable = False
    needs_channels = False
    needs_level = False  # built with level=i (its per-level state comes from a file)
    # The release's factor standardises the Avatar for MGD and MasKD, not for CWD (see uncertainty).
    release_standardises_avatar = True
    # Which of akd_cli.core.fused's passes computes this loss's teacher term for all Avatars at once
    # (None: the Avatars are looped), and whether it normalises the teacher itself (PKD).
    teacher_pass: Optional[str] = None
    normalises_teacher = False
    # Whether the compiled passes may prepare the student inside their call, with its factor
    # (akd_cli.core.fused.student_side): a preparation that draws no random numbers (a compiled
    # draw is not eager's) and calls no module of its own.
    prepares_in_passes = False

    def align_student(self, student: torch.Tensor) -> torch.Tensor:
        """The loss's own map of the student into the teacher's space (MasKD's align conv), applied
        before any uncertainty factor, as the release aligns in the distiller and normalises in the loss."""
        return student

    def prepare_student(self, student: torch.Tensor, **context) -> torch.Tensor:
        """Student-side work done once per call, shared by all Avatars (e.g. MGD's generation)."""
        return student

    def per_image(self, prepared: torch.Tensor, teacher: torch.Tensor, **context) -> torch.Tensor:
        if not self.fusable:
            raise NotImplementedError
        return self.fused(prepared, *self.target(prepared, teacher, **context), **context)

    # fusable losses only
    def target(self, prepared: torch.Tensor, teacher: torch.Tensor, **context) -> Tuple[torch.Tensor, torch.Tensor]:
        """(phi, constant): the teacher-side term and the student-free part of the loss (N, float64)."""
        raise NotImplementedError

    def fused(self, prepared: torch.Tensor, phi: torch.Tensor, constant: torch.Tensor,
              **context) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, **context) -> torch.Tensor:
        return self.per_image(self.prepare_student(self.align_student(student), **context), teacher, **context).sum()


class CWDLoss(BaseLoss):
    """Channel-wise distillation (Shu et al., 2021).

    For every (image, channel): KL(softmax(T / tau) || softmax(S / tau)) over the H*W positions,
    times tau^2; summed, divided by N*C, times ``loss_weight``. Fusable: the Avatars' spatial
    distributions are averaged (weighted) before the student's log-probabilities meet them.
    """

    fusable = True
    release_standardises_avatar = False  # Gumpest/AvatarKD:mmrazor/models/losses/akd_cwd.py uses the raw Avatar
    teacher_pass = "cwd"
    prepares_in_passes = True

    def __init__(self, tau: float = 1.0, loss_weight: float = 10.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"cwd: tau must be > 0, got {tau}")
        self.tau, self.loss_weight = tau, loss_weight

    def _scale(self, x: torch.Tensor) -> float:
        return self.loss_weight * self.tau ** 2 / (x.shape[0] * x.shape[1])

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2) if self.tau == 1.0 else x.flatten(2) / self.tau

    def prepare_student(self, student, **context):
        return F.log_softmax(self._scaled(student), dim=2)

    def target(self, prepared, teacher, **context):
        logits = self._scaled(teacher)
        phi = F.softmax(logits, dim=2)
        # sum p log p without a log over the map: log p = a - lse, and lse = a - log p at the mode
        p_max, at = phi.max(dim=2, keepdim=True)
        lse = logits.gather(2, at) - torch.log(p_max)
        entropy_term = _rowwise_dot(phi, logits) - lse.float().squeeze(2)
        return phi, entropy_term.sum(dim=1).double() * self._scale(phi)

    def fused(self, prepared, phi, constant, **context):
        cross = _rowwise_dot(phi, prepared).sum(dim=1) * self._scale(prepared)
        return constant.to(cross.dtype) - cross


class MSELoss(BaseLoss):
    """Mean squared error over all elements, times ``loss_weight``. Fusable through
    sum_k g_k |s - a_k|^2 = |s - a_bar|^2 + (sum_k g_k |a_k|^2 - |a_bar|^2): the weighted mean Avatar
    plus a constant (the Avatars' spread, computed in float64)."""

    fusable = True
    teacher_pass = "mse"  # MGD and PKD too: their teacher side is MSE's
    prepares_in_passes = True  # and PKD's; not MGD's (a random mask and the generation block)

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def _scale(self, x: torch.Tensor) -> float:
        return self.loss_weight / x.numel()

    def transform_teacher(self, teacher: torch.Tensor) -> torch.Tensor:
        return teacher

    def per_image(self, prepared, teacher, **context):
        # One teacher (the plain loss, or one Avatar): the fused form's spread is exactly 0 (the same
        # row-wise dot product subtracted from itself), so its two passes over the teacher are skipped.
        return self._squared_error(prepared, self.transform_teacher(teacher)) * self._scale(prepared)

    # Each image's sums go over positions per channel, then over channels. Compiled for a GPU, an
    # image's sum in one reduction (2 outputs for a batch of 2) splits in two, a launch more each;
    # the per-channel sums (N x C outputs) fuse into the Avatar passes' own read of the teacher
    # (bench/RESULTS.md). The plain loss takes the same order: one teacher's spread is then exactly 0.
    @staticmethod
    def _squared_error(prepared, reference):
        return (prepared - reference).float().pow(2).flatten(2).sum(dim=2).sum(dim=1)  # float32: fp16 sums overflow

    @staticmethod
    def _squares(phi):
        flat = phi.flatten(2)
        return _rowwise_dot(flat, flat).sum(dim=1)

    def target(self, prepared, teacher, **context):
        phi = self.transform_teacher(teacher)
        return phi, self._squares(phi).double()

    def fused(self, prepared, phi, constant, **context):
        spread = (constant - self._squares(phi).double()).clamp_min(0.0)
        squared = self._squared_error(prepared, phi)
        return (squared + spread.to(squared.dtype)) * self._scale(prepared)


def _pearson_normalise(x: torch.Tensor) -> torch.Tensor:
    """PKD's normalisation: each channel to zero mean, unit std over the batch and positions."""
    dims = [0] + list(range(2, x.dim()))
    std, mean = torch.std_mean(x, dim=dims, keepdim=True)
    return (x - mean).div_(std + 1e-6)  # in place: one temporary, not two, per Avatar


class PKDLoss(MSELoss):
    """Pearson-correlation distillation (Cao et al., 2022): MSE between the channel-normalised
    student and teacher, halved, times ``loss_weight``. Fusable like MSE (on normalised Avatars)."""

    normalises_teacher = True  # the fused Avatar passes compose its normalisation into the factor's

    def __init__(self, loss_weight: float = 6.0):
        super().__init__(loss_weight=loss_weight)

    def _scale(self, x):
        return self.loss_weight / (2.0 * x.numel())

    def prepare_student(self, student, **context):
        return _pearson_normalise(student)

    def transform_teacher(self, teacher):
        return _pearson_normalise(teacher)


class MGDLoss(MSELoss):
    """Masked generative distillation (Yang et al., 2022).

    A random spatial mask drops each student position with probability ``lambda_mgd``; a generation
    block (conv3x3-ReLU-conv3x3) regenerates the feature, whose summed squared error to the teacher
    is divided by N and times ``alpha_mgd``. The mask is drawn once per call and shared by all
    Avatars, so the Avatars are fused like MSE against one generated student feature.
    """

    needs_channels = True
    prepares_in_passes = False

    def __init__(self, channels: int, alpha_mgd: float = 2e-5, lambda_mgd: float = 0.65):
        super().__init__(loss_weight=alpha_mgd)
        if not 0.0 <= lambda_mgd < 1.0:
            raise ValueError(f"mgd: lambda_mgd must be in [0, 1), got {lambda_mgd}")
        self.alpha_mgd, self.lambda_mgd = alpha_mgd, lambda_mgd
        self.generation = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1))

    def _scale(self, x):
        return self.alpha_mgd / x.shape[0]

    def prepare_student(self, student, **context):
        n, _, h, w = student.shape
        keep = (torch.rand((n, 1, h, w), device=student.device) >= self.lambda_mgd).to(student.dtype)
        return self.generation((student * keep).to(self.generation[0].weight.dtype))


class MasKDLoss(BaseLoss):
    """Masked distillation with receptive tokens (Huang et al., 2023), distillation stage.

    The level's receptive tokens (``akd_cli.core.tokens``) turn the teacher feature into T soft masks
    m_t and weight them per image (w_t). Per image and token, the masked squared error
    sum_hw (m_t (S - T))^2 / sum_hw m_t is averaged over channels; the tokens' weighted sum, averaged
    over the batch and times ``loss_weight``, is the loss. With ``student_masks_after`` = k, from
    the k-th call on each mask is also multiplied by the student's own mask (MasKD's "custom masks";
    its FCOS setting is 5000). ``align`` adds a trainable 1x1 conv on the student (MasKD's configs do).

    The tokens are learnt beforehand on the teacher (``akd train --learn-tokens``) and stay fixed
    here: pass ``token_file`` (akd's or MasKD's released files) and ``level``. Without a file, seeded
    random tokens stand in, and the loss is then not MasKD's.

    Fusable, although the masks depend non-linearly on each Avatar: the loss is
    sum_hw b(hw) |S(hw) - T(hw)|^2 (over channels) with one weight per position,
    b = sum_t w_t m_t^2 / (c sum_hw m_t), computed from the teacher side alone. So the Avatars
    combine into B = sum_k g_k b_k and the weighted mean Avatar sum_k g_k b_k A_k / B at each position,
    plus their spread, as for MSE: one student-side evaluation for any number of Avatars.
    """

    fusable = True
    needs_channels = True
    needs_level = True
    teacher_pass = "maskd"

    def __init__(self, channels: int, num_tokens: int = 6, loss_weight: float = 10.0, token_file: Optional[str] = None,
                 weight_tokens: bool = True, student_masks_after: Optional[int] = None, align: bool = False,
                 token_seed: int = 0, level: int = 0):
        super().__init__()
        from akd_cli.core.tokens import ReceptiveTokens, load_into, load_token_file

        self.loss_weight = loss_weight
        self.student_masks_after = student_masks_after
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(token_seed + level)  # reproducible stand-in tokens, independent of the caller's RNG
        try:
            self.tokens = ReceptiveTokens(channels, num_tokens, weighted=weight_tokens)
        finally:
            torch.random.set_rng_state(generator_state)
        if token_file:
            load_into(self.tokens, load_token_file(token_file), level, token_file)
        self.tokens.requires_grad_(False)
        self.align = nn.Conv2d(channels, channels, 1) if align else None
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._with_student_masks = False
        # The buffer's value on the host: reading the buffer itself on a GPU waits for all queued
        # work, once per level per step. Read once, then counted alongside; a loaded state (a
        # resumed run) makes it read again.
        self._calls_on_host: Optional[int] = None

    def _load_from_state_dict(self, *args, **kwargs):
        # the hook both torch's load_state_dict and mmcv's own checkpoint loader call per module
        super()._load_from_state_dict(*args, **kwargs)
        self._calls_on_host = None

    def align_student(self, student):
        return self.align(student) if self.align is not None else student

    def prepare_student(self, student, **context):
        if self._calls_on_host is None:
            self._calls_on_host = int(self.calls)
        self.calls += 1
        self._calls_on_host += 1
        self._with_student_masks = (self.student_masks_after is not None
                                    and self._calls_on_host > self.student_masks_after)
        return student

    def _masks_and_weights(self, prepared, teacher):
        # float32 whatever autocast made of the token products: c * sum_hw m_t alone exceeds 65504
        masks = self.tokens.masks(teacher.float()).float()                             # N x T x H x W
        if self._with_student_masks:
            with torch.no_grad():
                masks = masks * self.tokens.masks(prepared.detach().float()).float()
        return masks, self.tokens.weights(teacher.float()).float()                     # N x T

    def _position_weights(self, prepared, teacher):
        """b = sum_t w_t m_t^2 / (c sum_hw m_t), N x 1 x H x W: the loss is sum_hw b |S - T|^2."""
        masks, weights = self._masks_and_weights(prepared, teacher)
        per_token = weights / (teacher.shape[1] * masks.sum(dim=(2, 3)))                # N x T
        with float32_reductions(masks):
            return torch.einsum("nt,nthw->nhw", per_token, masks.pow(2)).unsqueeze(1)

    @staticmethod
    def _weighted_squared_error(position, student, reference):
        """sum_hw b |S - R|^2 per image; summed over channels before the weights meet it, so there
        is no second N x C x H x W temporary."""
        squared = (student - reference).float().pow(2).sum(dim=1, keepdim=True)
        return (position * squared).flatten(1).sum(dim=1)

    def per_image(self, prepared, teacher, **context):
        position = self._position_weights(prepared, teacher)
        return self._weighted_squared_error(position, prepared, teacher) * (self.loss_weight / teacher.shape[0])

    def target(self, prepared, teacher, **context):
        position = self._position_weights(prepared, teacher)
        n, c, h, w = teacher.shape
        # One tensor for the accumulator: b * A in the first C channels, b in the last, written in
        # place (no concatenated copy). float32 always: b is ~1e-7 on real maps, under float16's range.
        phi = torch.empty((n, c + 1, h, w), dtype=torch.float32, device=teacher.device)
        weighted = phi[:, :c].copy_(teacher).mul_(position)
        phi[:, c:] = position
        return phi, _rowwise_dot(weighted.flatten(1), teacher.flatten(1)).double()

    def fused(self, prepared, phi, constant, **context):
        n, c = prepared.shape[:2]
        # The position weights, saved for the student's gradient, in a tensor of their own (1 / C of a
        # map): as a view, compiled with the Avatars' passes (akd_cli.core.fused.group_losses), the
        # backward checked them against the accumulator's strides at the first call's sizes, where
        # inductor had laid it out channels-last, and a level of other sizes failed (torch 2.13).
        weighted, position = phi[:, :c], phi[:, c:].contiguous()
        mean_avatar = weighted / position.clamp_min(torch.finfo(position.dtype).tiny)
        squared = self._weighted_squared_error(position, prepared, mean_avatar)
        spread = (constant - _rowwise_dot(weighted.flatten(1), mean_avatar.flatten(1)).double()).clamp_min(0.0)
        return (squared + spread.to(squared.dtype)) * (self.loss_weight / n)


class FGDLoss(BaseLoss):
    """Focal and global distillation (Yang et al., 2022).

    Needs the ground-truth boxes: pass ``gt_bboxes`` (one K_i x 4 tensor of x1, y1, x2, y2 input-image
    pixels per image) and ``img_shape`` as context: a list of each image's (H, W) before padding, by
    which FGD maps the boxes onto the feature map (as FGD's code does), or one (H, W) for all. Terms:
    foreground and background feature imitation weighted by the teacher's spatial and channel
    attention (``alpha_fgd``, ``beta_fgd``), attention imitation (``gamma_fgd``) and global relation
    imitation through GcBlocks (``lambda_fgd``). Not fusable: the attention and the teacher-side
    GcBlock depend non-linearly on each Avatar (and the GcBlock is trained), so Avatars are looped and
    peak memory grows with their number.
    """

    needs_channels = True

    def __init__(self, channels: int, temp: float = 0.5, alpha_fgd: float = 1e-3, beta_fgd: float = 5e-4,
                 gamma_fgd: float = 5e-4, lambda_fgd: float = 5e-6):
        super().__init__()
        self.temp, self.alpha_fgd, self.beta_fgd = temp, alpha_fgd, beta_fgd
        self.gamma_fgd, self.lambda_fgd = gamma_fgd, lambda_fgd
        self.conv_mask_s = nn.Conv2d(channels, 1, 1)
        self.conv_mask_t = nn.Conv2d(channels, 1, 1)
        hidden = max(channels // 2, 1)

        def channel_add():
            return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

        self.channel_add_s, self.channel_add_t = channel_add(), channel_add()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """FGD's own initialisation (yzd-v/FGD:mmdet/distillation/losses/fgd.py): the attention convs
        kaiming-normal with fan-in, the last conv of each channel-add block zero (so the global
        relation starts as the identity)."""
        for conv in (self.conv_mask_s, self.conv_mask_t):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for block in (self.channel_add_s, self.channel_add_t):
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)

    def _attention(self, x: torch.Tensor):
        n, c, h, w = x.shape
        value = x.abs()
        spatial = h * w * F.softmax((value.mean(dim=1) / self.temp).view(n, -1), dim=1).view(n, h, w)
        channel = c * F.softmax(value.mean(dim=(2, 3)) / self.temp, dim=1)
        return spatial, channel

    def _masks(self, teacher, gt_bboxes, img_shape):
        n, _, h, w = teacher.shape
        fg = teacher.new_zeros((n, h, w))
        bg = teacher.new_ones((n, h, w))
        shapes = img_shape if isinstance(img_shape, (list, tuple)) and img_shape and \
            isinstance(img_shape[0], (list, tuple)) else [img_shape] * n
        for i, boxes in enumerate(gt_bboxes):
            img_h, img_w = shapes[i][:2]
            boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            for x1, y1, x2, y2 in boxes.tolist():
                w0, w1 = int(math.floor(x1 * w / img_w)), int(math.ceil(x2 * w / img_w))
                h0, h1 = int(math.floor(y1 * h / img_h)), int(math.ceil(y2 * h / img_h))
                area = 1.0 / (h1 + 1 - h0) / (w1 + 1 - w0)
                region = fg[i, max(h0, 0):h1 + 1, max(w0, 0):w1 + 1]
                region.clamp_(min=area)
            bg[i] = (fg[i] <= 0).to(bg.dtype)
            total = bg[i].sum()
            if total > 0:
                bg[i] /= total
        return fg, bg

    def _global(self, x, conv_mask, channel_add):
        n, c, h, w = x.shape
        attention = F.softmax(conv_mask(x).view(n, 1, h * w), dim=2)             # N x 1 x HW
        context = torch.bmm(x.view(n, c, h * w), attention.transpose(1, 2))       # N x C x 1
        return x + channel_add(context.view(n, c, 1, 1))

    def per_image(self, prepared, teacher, gt_bboxes=None, img_shape=None, **context):
        if gt_bboxes is None or img_shape is None:
            raise ValueError("fgd needs the ground-truth boxes: pass gt_bboxes=[...] and img_shape=(H, W)")
        if len(gt_bboxes) != teacher.shape[0]:
            raise ValueError(f"fgd: {len(gt_bboxes)} box lists for a batch of {teacher.shape[0]} images")
        dtype = self.conv_mask_s.weight.dtype  # its sums overflow float16, and its convs are float32
        prepared, teacher = prepared.to(dtype), teacher.to(dtype)
        s_spatial, s_channel = self._attention(prepared)
        t_spatial, t_channel = self._attention(teacher)
        fg, bg = self._masks(teacher, gt_bboxes, img_shape)
        weight = (t_spatial.unsqueeze(1) * t_channel[:, :, None, None])           # N x C x H x W
        error = (prepared - teacher).pow(2) * weight
        fg_loss = (error * fg.unsqueeze(1)).sum(dim=(1, 2, 3))
        bg_loss = (error * bg.unsqueeze(1)).sum(dim=(1, 2, 3))
        attention_loss = ((s_channel - t_channel).abs().sum(dim=1)
                          + (s_spatial - t_spatial).abs().sum(dim=(1, 2)))
        relation = (self._global(prepared, self.conv_mask_s, self.channel_add_s)
                    - self._global(teacher, self.conv_mask_t, self.channel_add_t)).pow(2).sum(dim=(1, 2, 3))
        total = (self.alpha_fgd * fg_loss + self.beta_fgd * bg_loss
                 + self.gamma_fgd * attention_loss + self.lambda_fgd * relation)
        return total / teacher.shape[0]


BASE_LOSSES: Dict[str, Type[BaseLoss]] = {
    "cwd": CWDLoss, "mgd": MGDLoss, "maskd": MasKDLoss, "fgd": FGDLoss, "pkd": PKDLoss, "mse": MSELoss,
}


def build_base_losses(name: str, num_levels: Optional[int], channels, **kwargs) -> nn.ModuleList:
    """One base-loss module per level for losses with parameters, one shared module otherwise."""
    if name not in BASE_LOSSES:
        raise ValueError(f"unknown base loss {name!r}; expected one of {sorted(BASE_LOSSES)}")
    cls = BASE_LOSSES[name]
    try:
        if not cls.needs_channels:
            return nn.ModuleList([cls(**kwargs)])
        if channels is None:
            raise ValueError(f"{name} has parameters per level: pass channels=[C per level] "
                             "(or channels=C with num_levels=L)")
        per_level: Sequence[int] = ([channels] * (num_levels or 1) if isinstance(channels, int)
                                    else list(channels))
        if cls.needs_level:
            return nn.ModuleList([cls(channels=c, level=i, **kwargs) for i, c in enumerate(per_level)])
        return nn.ModuleList([cls(channels=c, **kwargs) for c in per_level])
    except TypeError as exc:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "channels", "level")]
        raise ValueError(f"{name}: {exc}; accepted options: {', '.join(accepted)}") from None

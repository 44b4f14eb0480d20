"""AKDLoss: any base feature-distillation loss, taught by Avatars of the teacher."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from akd_cli.core import fused as fused_passes
from akd_cli.core.avatars import make_avatar
from akd_cli.core.counter_rng import Drop, draw_seed
from akd_cli.core.losses import build_base_losses
from akd_cli.core.precision import float32_reductions
from akd_cli.core.uncertainty import (AvatarWeigher, inverse_sigma, squared_difference_per_channel, standardise,
                                      student_under_factor, update_running)
from akd_cli.names import AVATAR_KERNELS, AVATAR_RNGS, AVATAR_WEIGHTINGS, BASE_LOSSES, PERTURBATIONS, UNCERTAINTY_MODES

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


class AKDLoss(nn.Module):
    """Avatar Knowledge Distillation around a base loss.

    >>> loss_fn = AKDLoss(base="cwd", num_avatars=2, drop_rate=0.1, uncertainty="paper", tau=1.0)
    >>> loss = loss_fn(student_feats, teacher_feats)   # tensors or lists of N x C x H x W tensors

    For each level, ``num_avatars`` Avatars are drawn from the (detached) teacher feature, the
    uncertainty factor is applied to the Avatars and the student (see ``akd_cli.core.uncertainty``),
    and the base loss is taken between the student and the Avatars, averaged over them (or weighted
    per image, ``weighting="inverse_variance"``). ``num_avatars=0`` is the plain base loss between
    student and teacher: classic KD and AKD run the same code.

    Args:
        base: one of ``cwd``, ``mgd``, ``maskd``, ``fgd``, ``pkd``, ``mse``.
        num_avatars: Avatars per level per call (0: no Avatars).
        drop_rate: perturbation strength in [0, 1): the dropout probability, or the relative noise
            std for ``perturbation="noise"``.
        uncertainty: ``paper`` (sigma divides Avatars and student), ``release`` (the release's
            per-loss standardisation) or ``none``.
        weighting: ``mean`` or ``inverse_variance``: how several Avatars combine.
        perturbation: ``dropout`` (element-wise; the paper's), ``channel`` or ``noise``.
        sigma_momentum: momentum of the running sigma^2 of ``paper`` (the expectation over the data).
        channels: channels per level, for base losses with parameters (MGD, MasKD, FGD) and for
            ``paper``'s running estimate; an int with ``num_levels``, or a list.
        fused: combine Avatars before the student-side term where the base loss allows it (same
            value as the per-Avatar loop, memory independent of ``num_avatars``).
        avatar_kernel: ``loop`` (one Avatar at a time: the reference), ``compiled`` (all Avatars of a
            level in a few ``torch.compile``d passes over the teacher, none stored; dropout and the
            losses of ``akd_cli.core.fused.FUSED_BASES`` only), or ``fused`` (those passes uncompiled,
            storing all Avatars: for checking ``compiled``).
        avatar_rng: where dropout masks come from: ``torch``'s generator (the loop's default, as the
            release draws them) or the ``counter``-based generator (``akd_cli.core.counter_rng``), which
            ``compiled`` and ``fused`` need: with it the loop draws the very Avatars they draw.
        **base_kwargs: the base loss's own options (``tau``, ``loss_weight``, ``alpha_mgd``, ...).
    """

    def __init__(self, base: str = "cwd", num_avatars: int = 1, drop_rate: float = 0.1,
                 uncertainty: str = "release", weighting: str = "mean", perturbation: str = "dropout",
                 sigma_momentum: float = 0.1, channels: Optional[Union[int, Sequence[int]]] = None,
                 num_levels: Optional[int] = None, fused: bool = True, avatar_kernel: str = "loop",
                 avatar_rng: Optional[str] = None, **base_kwargs):
        super().__init__()
        if isinstance(num_avatars, bool) or not isinstance(num_avatars, int) or num_avatars < 0:
            raise ValueError(f"num_avatars must be an integer >= 0, got {num_avatars!r}")
        if not (0.0 <= float(drop_rate) < 1.0):
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if not (0.0 < float(sigma_momentum) <= 1.0):
            raise ValueError(f"sigma_momentum must be in (0, 1], got {sigma_momentum!r}")
        for value, allowed, what in ((uncertainty, UNCERTAINTY_MODES, "uncertainty"),
                                     (weighting, AVATAR_WEIGHTINGS, "weighting"),
                                     (perturbation, PERTURBATIONS, "perturbation"), (base, BASE_LOSSES, "base loss"),
                                     (avatar_kernel, AVATAR_KERNELS, "avatar kernel")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
        if avatar_rng is None:
            avatar_rng = "torch" if avatar_kernel == "loop" else "counter"
        if avatar_rng not in AVATAR_RNGS:
            raise ValueError(f"unknown avatar rng {avatar_rng!r}; expected one of {', '.join(AVATAR_RNGS)}")
        if avatar_kernel != "loop":
            if avatar_rng != "counter":
                raise ValueError(f"avatar_kernel={avatar_kernel!r} regenerates each dropout mask in every pass: "
                                 "it needs avatar_rng='counter'")
            problem = fused_passes.unserved(base, perturbation)
            if problem:
                raise ValueError(f"avatar_kernel={avatar_kernel!r}: {problem}")
        if avatar_rng == "counter" and perturbation != "dropout":
            raise ValueError(f"the counter-based generator (avatar_kernel {avatar_kernel!r}, avatar_rng 'counter') "
                             f"draws dropout Avatars, not {perturbation!r}")
        self.base_name = base
        self.num_avatars = num_avatars
        self.drop_rate = float(drop_rate)
        self.uncertainty = uncertainty
        self.weighting = weighting
        self.perturbation = perturbation
        self.sigma_momentum = float(sigma_momentum)
        self.fused = fused
        self.avatar_kernel = avatar_kernel
        self.avatar_rng = avatar_rng
        self.base_losses = build_base_losses(base, num_levels, channels, **base_kwargs)
        if channels is not None and uncertainty == "paper":
            per_level = [channels] * (num_levels or 1) if isinstance(channels, int) else list(channels)
            for level, c in enumerate(per_level):
                self._sigma_state(level, c, torch.device("cpu"))

    def extra_repr(self) -> str:
        return (f"base={self.base_name}, num_avatars={self.num_avatars}, drop_rate={self.drop_rate}, "
                f"uncertainty={self.uncertainty}, weighting={self.weighting}, perturbation={self.perturbation}, "
                f"fused={self.fused}, avatar_kernel={self.avatar_kernel}, avatar_rng={self.avatar_rng}")

    def forward(self, student: Features, teacher: Features, **context) -> torch.Tensor:
        """Sum over levels of the base loss on the Avatars. ``context`` reaches the base loss
        (FGD's ``gt_bboxes`` and ``img_shape``)."""
        return torch.stack(self.per_level(student, teacher, **context)).sum()

    def per_level(self, student: Features, teacher: Features, **context) -> List[torch.Tensor]:
        """The loss of each level. What the levels share (the counter generator's seeds and keys, the
        passes' statistics, the paper's sigma with its one all-reduce) is settled first, for all
        levels at once; then each level's loss.

        Non-finite features raise a ValueError naming the level, after the levels' work is queued:
        that check is the call's only read from the device, so on a GPU the host queues the loss
        while the GPU still runs the forward passes before it (a read before the loss would wait
        for them, and the loss's host work would then run with the GPU idle). The running sigma is
        not updated from such a call."""
        students, teachers = self._validate(student, teacher)
        teachers = [t.detach() for t in teachers]
        finite = _all_finite(students + teachers)
        if self.num_avatars == 0:
            losses = [self._base_for(i)(s, t, **context) for i, (s, t) in enumerate(zip(students, teachers))]
        else:
            step = self._prepare_step(teachers, finite)
            if step.keys is not None:  # the passes (any Avatar count)
                losses = self._fused_losses(students, teachers, step, **context)
            else:
                losses = [self._level_loss(i, s, t, step, **context)
                          for i, (s, t) in enumerate(zip(students, teachers))]
        _raise_if_not_finite(finite, students, teachers)
        return losses

    def running_sigma(self, level: int) -> Optional[torch.Tensor]:
        """``paper``'s running sigma of a level (per channel), or None before its first step."""
        steps = getattr(self, f"sigma_steps_{level}", None)
        if steps is None or int(steps) == 0:
            return None
        return getattr(self, f"sigma2_{level}").sqrt()

    # ----------------------------------------------------------------------------------------
    def _base_for(self, level: int):
        return self.base_losses[level if len(self.base_losses) > 1 else 0]

    def _prepare_step(self, teachers: List[torch.Tensor], finite: torch.Tensor) -> "_Step":
        """What this call's levels share, for all levels at once: one seed draw and one keys call for
        the counter-based generator (not one per level), and the paper's 1 / sigma of every level
        from one all-reduce, its sums from one statistics call. Through the passes, each level's
        other statistics come in its terms call (``_fused_losses``), the
        paper's in its statistics call."""
        k, device = self.num_avatars, teachers[0].device
        step = _Step(len(teachers), device)
        if self.drop_rate == 0.0:
            return step  # every Avatar is the teacher: nothing to draw, no spread for the paper's sigma
        if self.avatar_rng == "counter":
            step.seeds = draw_seed(device, (len(teachers),))
            if self.avatar_kernel != "loop":
                # L x K keys in one call; level l's equal avatar_keys(seeds[l], 0 .. K-1), which the
                # loop computes from seeds[l] itself. Unbound per level in three calls, not 3 L selects.
                seed_key, key, mult = fused_passes.function("keys", self.avatar_kernel == "compiled")(
                    step.seeds[:, None], fused_passes.avatar_indices(k, device)[None])
                step.keys = list(zip(seed_key.unbind(0), key.unbind(0), mult.unbind(0)))
                if self.uncertainty == "paper":
                    # every statistic the passes need, with the sigma's sum, in one call for all levels
                    step.stats = self._statistics(teachers, step)
        if self.uncertainty == "paper":
            if step.stats is not None:
                totals = [stats["sigma_sum"] for stats in step.stats]
            else:
                totals = self._sigma_totals(teachers, step)
            step.inverse = self._inverse_sigmas(teachers, totals, finite)
        return step

    def _level_loss(self, level: int, student: torch.Tensor, teacher: torch.Tensor, step: "_Step", **context):
        base = self._base_for(level)
        student = base.align_student(student)
        scale = step.scale(level, student.dtype)
        prepared = base.prepare_student(self._student_under_factor(student, scale), **context)
        if self.num_avatars == 1:
            # One Avatar needs no weighting pass and no accumulator: its loss is the base loss on it.
            with step.avatar_draws():
                avatar = self._as_seen(base, self._avatar(teacher, step, level, 0), scale)
            return base.per_image(prepared, avatar, **context).sum()
        fuse = self.fused and base.fusable
        # Weights and accumulators stay in float32 whatever the features' dtype: the unnormalised
        # inverse-variance weights exceed float16's range (1 / u is ~1e5 on real FPN maps).
        total_weight = weighted = weighted_constant = phi_dtype = phi = term = None
        weigher = AvatarWeigher(teacher, self.weighting)
        with step.avatar_draws():
            for index in range(self.num_avatars):
                raw = self._avatar(teacher, step, level, index)
                weight = weigher(raw)                                                  # N, float32
                avatar = self._as_seen(base, raw, scale)
                raw = None
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

    def _avatar(self, teacher: torch.Tensor, step: "_Step", level: int, index: int) -> torch.Tensor:
        """Avatar ``index`` of a level in this call: from torch's generator (each call draws the next
        one), or from the counter-based stream of the level's seed.

        The loop's alone: the passes (``avatar_kernel`` compiled or fused) regenerate their
        Avatars inside their calls, one Avatar as well as several."""
        seed = step.seeds[level] if step.seeds is not None else None
        return make_avatar(teacher, self.perturbation, self.drop_rate, seed=seed, index=index)

    def _statistics(self, teachers: List[torch.Tensor], step: "_Step") -> List[dict]:
        """The paper factor's statistics pass, over all levels in one call, before its all-reduce:
        the sum for sigma, and the other statistics of the raw Avatars the options need, for the
        terms calls."""
        base = self._base_for(0)  # one base loss class for all levels: the same statistics
        # the paper's factor standardises nothing (the release's does)
        wanted = fused_passes.wanted_statistics(True, False, base.normalises_teacher, self.weighting)
        with torch.no_grad(), float32_reductions(teachers[0]):
            return fused_passes.levels("statistics", self.avatar_kernel == "compiled")(
                [(teacher, keys, Drop.of(self.drop_rate)) for teacher, keys in zip(teachers, step.keys)],
                dict(wanted, layout=fused_passes.layout_for(base.teacher_pass)))

    def _fused_losses(self, students: List[torch.Tensor], teachers: List[torch.Tensor], step: "_Step",
                      **context) -> List[torch.Tensor]:
        """The loop's values, with the teacher side of all levels' Avatars in a few passes
        (akd_cli.core.fused): the paper factor's statistics (``_prepare_step``, one call for all
        levels), then the rest of each level's teacher side, from its Avatars' keys to the base
        loss's terms, and its student side, in one call for a group of levels
        (``fused.group_losses``): the first level (an FPN's largest, three quarters of its
        elements), then the others together.

        One call for all levels would make every level's teacher term, and each level's student as
        the loss takes it, exist at once before the first level's loss: on ResNet-50 FPN shapes
        (CPU, 8 Avatars) that raised the loss's peak by 10%, about a quarter of a level-0 map.
        With the first level alone the peak is the per-level calls' own."""
        losses = []
        for group in ([0], list(range(1, len(teachers)))):
            if group:
                losses += self._fused_group(group, students, teachers, step, **context)
        return losses

    def _fused_group(self, group: List[int], students: List[torch.Tensor], teachers: List[torch.Tensor],
                     step: "_Step", **context) -> List[torch.Tensor]:
        bases, prepared, arguments = [], [], []
        for level in group:
            base, student, teacher = self._base_for(level), students[level], teachers[level]
            student = base.align_student(student)
            scale = step.scale(level, student.dtype)
            if base.prepares_in_passes:  # in the group's call (fused.student_side): fewer host calls
                ready = (student, scale, self.uncertainty)
            else:
                ready = base.prepare_student(self._student_under_factor(student, scale), **context)
            with torch.no_grad(), float32_reductions(teacher):
                if base.teacher_pass == "cwd":
                    extra = (base.tau, base._scale(teacher))
                elif base.teacher_pass == "maskd":
                    extra = (base.tokens, base.tokens.masks(ready.detach().float()).float()
                             if base._with_student_masks else None)
                else:
                    extra = ()
            arguments.append((teacher, step.keys[level], scale,
                              step.stats[level] if step.stats is not None else None, extra))
            bases.append(base)
            prepared.append(ready)
        base = bases[0]
        keywords = dict(drop=Drop.of(self.drop_rate),
                        standardised=self.uncertainty == "release" and base.release_standardises_avatar,
                        pearson=base.normalises_teacher, weighting=self.weighting,
                        layout=fused_passes.layout_for(base.teacher_pass))
        return fused_passes.function(base.teacher_pass + "_group", self.avatar_kernel == "compiled")(
            bases, prepared, arguments, keywords, [teachers[level].dtype for level in group])

    def _student_under_factor(self, student: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """The student as the base loss takes it under the factor (``scale``: the paper's 1 / sigma,
        1 x C x 1 x 1, or None)."""
        return student_under_factor(student, scale, self.uncertainty)

    def _as_seen(self, base, avatar: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """The Avatar as the base loss takes it under the factor."""
        if scale is not None:
            return avatar * scale
        if self.uncertainty == "release" and base.release_standardises_avatar:
            return standardise(avatar)
        return avatar

    def _sigma_state(self, level: int, channels: int, device: torch.device):
        """The running sigma^2 of a level and its step count: buffers, so checkpoints keep them."""
        name = f"sigma2_{level}"
        running = getattr(self, name, None)
        if running is None or running.numel() != channels:
            self.register_buffer(name, torch.zeros(channels, device=device))
            self.register_buffer(f"sigma_steps_{level}", torch.zeros((), dtype=torch.long, device=device))
        return getattr(self, name), getattr(self, f"sigma_steps_{level}")

    def _sigma_totals(self, teachers: List[torch.Tensor], step: "_Step") -> List[torch.Tensor]:
        """Per level, sum (a_k - T)^2 per channel over this call's Avatars, images and positions
        (C, float32), Avatar by Avatar (the loop's way, none kept).

        The levels' losses then draw the very same Avatars: the counter-based generator by
        construction; torch's generator replays its stream from where these draws began
        (``_Step.avatar_draws``), while the base losses' own draws (MGD's student masks) go on from
        where they ended, so they share no random numbers with the Avatars and cannot shift them."""
        with torch.no_grad():
            start = _rng_state(step.device) if step.seeds is None else None
            totals = []
            for level, teacher in enumerate(teachers):
                total = torch.zeros(teacher.shape[1], device=teacher.device, dtype=torch.float32)
                for index in range(self.num_avatars):
                    total += squared_difference_per_channel(self._avatar(teacher, step, level, index), teacher)
                totals.append(total)
            step.replay = start
            return totals

    def _inverse_sigmas(self, teachers: List[torch.Tensor], totals: List[torch.Tensor],
                        finite: torch.Tensor) -> List[torch.Tensor]:
        """1 / sigma per channel of each level (C each) from this call's sums of (a_k - T)^2: all
        ranks' sums together, then the running estimates. All levels' sums, their sample counts and
        a flag for non-finite features travel in one all-reduce (two per level before).

        A call whose features hold non-finite values, on any rank, leaves the running estimates as
        they were: it raises once its work is queued (``per_level``)."""
        counts = [float(self.num_avatars * t.shape[0] * t.shape[2] * t.shape[3]) for t in teachers]
        with torch.no_grad():
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                device = totals[0].device
                # torch.full fills on the device; torch.tensor would copy from the host, and a
                # blocking copy to a GPU waits for all queued work (a host sync)
                flat = torch.cat(totals + [torch.full((1,), count, device=device) for count in counts]
                                 + [(~finite).float().view(1)])
                torch.distributed.all_reduce(flat)
                parts = flat.split([total.numel() for total in totals] + [1] * (len(counts) + 1))
                totals, counts, finite = parts[:len(totals)], parts[len(totals):-1], parts[-1][0] == 0
            inverse = []
            for level, (teacher, total, count) in enumerate(zip(teachers, totals, counts)):
                batch = total / count
                running, steps = self._sigma_state(level, total.numel(), teacher.device)
                if self.training:
                    sigma2 = update_running(running, batch, steps, self.sigma_momentum, apply=finite)
                else:
                    sigma2 = torch.where(steps > 0, running, batch)  # no host sync to read the counter
                inverse.append(inverse_sigma(sigma2))
            return inverse

    def _validate(self, student: Features, teacher: Features):
        """Levels, types and shapes (the host's checks; finiteness is checked by ``per_level``)."""
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
        return students, teachers


class _Step:
    """What one call's levels share, settled before any level's loss (``AKDLoss._prepare_step``)."""

    def __init__(self, levels: int, device: torch.device):
        self.device = device
        self.seeds: Optional[torch.Tensor] = None     # L seeds of the counter-based generator
        self.keys: Optional[list] = None              # per level, its Avatars' keys (compiled or fused kernel)
        self.stats: Optional[list] = None             # per level, the paper factor's statistics (compiled or fused)
        self.inverse: list = [None] * levels          # per level, the paper's 1 / sigma (C), or None
        self.replay: Optional[torch.Tensor] = None    # torch's generator state the Avatar draws resume from

    def scale(self, level: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The paper's 1 / sigma of a level as the student and its Avatars are multiplied by it
        (1 x C x 1 x 1, in ``dtype``), or None without that factor."""
        inverse = self.inverse[level]
        return None if inverse is None else inverse.to(dtype).view(1, -1, 1, 1)

    @contextlib.contextmanager
    def avatar_draws(self):
        """Draw Avatars from torch's generator where the sigma's draws of them began (see
        ``AKDLoss._sigma_totals``); without a replay state, from the generator as it stands."""
        if self.replay is None:
            yield
            return
        main = _rng_state(self.device)
        _set_rng_state(self.device, self.replay)
        try:
            yield
        finally:
            self.replay = _rng_state(self.device)
            _set_rng_state(self.device, main)


def _all_finite(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-d bool tensor on their device (not
    read here). One reduction per tensor, its minimum and maximum (``aminmax``): NaN propagates
    through both (torch's MinMaxOps, shared by the CPU and CUDA), -inf shows in the minimum, +inf
    in the maximum, and neither can overflow. ``isfinite(x).all()`` took five kernels and four
    passes over each feature map (isfinite is itself eq, abs, ne and and): on the CPU, 16% of the
    time of an MSE loss with one Avatar on ResNet-50 FPN shapes, some 50 times this check's."""
    ends = [end for x in tensors if x.numel() for end in torch.aminmax(x)]
    if not ends:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device)
    return torch.isfinite(torch.stack(ends)).all()


def _raise_if_not_finite(finite: torch.Tensor, students: List[torch.Tensor], teachers: List[torch.Tensor]) -> None:
    # The call's one read from the device; the culprit is searched only when something is wrong.
    if bool(finite):
        return
    for i, (s, t) in enumerate(zip(students, teachers)):
        for role, x in (("student", s), ("teacher", t)):
            if not bool(_all_finite([x])):
                raise ValueError(f"level {i}: {role} feature of shape {tuple(x.shape)} holds non-finite values")


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.random.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.random.set_rng_state(state)

r"""The teacher side of AKD for all K Avatars of a level at once, none of them stored: compiled
(``torch.compile``: Triton on a GPU, C++ on the CPU), each Avatar element is regenerated in
registers from the teacher element and a counter-based dropout mask (``akd_cli.core.counter_rng``)
inside the few reductions that need it. All K Avatars share one element hash; a pass's ``layout``
says whether it holds them as one K x N x C x H x W expression or as K expressions.

What a step computes, for the base losses whose teacher side is a weighted sum (CWD, MSE, MGD, PKD,
MasKD; see ``akd_cli.core.losses``), and how many passes over the teacher map it takes:

1. statistics of the raw Avatars, only those the options need (one pass per reduction shape): the
   paper's sum (a_k - T)^2 per channel; the release's per-(Avatar, channel) mean and variance (its
   standardisation, in Welford's one pass); per-(Avatar, image, channel) means (the
   inverse-variance weights);
2. the factor, as a per-(Avatar, channel) affine map a -> (a - shift) * mult or (a - shift) / div
   (the paper's sigma: mult = 1 / sigma; the release's: shift = mean, div = sqrt(var + eps); PKD's
   normalisation composed on top); the weights g[k, n] (a constant 1 / K where they weigh the same);
3. the base loss's teacher term phi_bar = sum_k g phi(a_k) / sum_k g and the student-free
   constant (CWD: row maximum, then exp-sums, then the K-reduction: three passes; MSE/MGD/PKD: one;
   MasKD: its token masks, then one).

The student side (``BaseLoss.fused``, through ``student_side``) is the loop path's own code,
compiled too (forward and backward), so values and gradients equal the loop path's
(``AKDLoss(avatar_kernel="loop", avatar_rng="counter")``) to float32 rounding: only the order of
the sums differs. Under float16 autocast the features arrive in float16; these passes compute in
float32 throughout (the loop path computes each Avatar in the feature's dtype), so the two agree
to float16's precision, and no sum can overflow.

A call of the loss makes three compiled calls forward and two backward, whatever its level count:
the keys of all levels' Avatars (``counter_rng.avatar_keys``), then a group's whole teacher side
(``teacher_terms``: statistics, factor, weights, terms) and its student side (``group_losses``),
for the first level, then for the others (``AKDLoss._fused_losses`` says why two groups), each
one call forward and one backward. The paper's factor adds one after the keys: its statistics, all
levels at once, which its all-reduce and running estimate need before any Avatar is normalised.
Each compiled call, and each eager call around them, costs host time, and on a GPU the loss is
bound by the host, not by bandwidth. What stays eager: the student's preparation where it draws
random numbers or reads the prepared student before the teacher terms (MGD's mask and generation,
MasKD's token masks; CWD, MSE and PKD prepare theirs in the group's call, ``student_side``), and
the finiteness check.

These passes serve any number of Avatars, one included. With one, they had made a training step
slower than the loop when each level took three compiled calls (an H100, +14% against +2.4%,
bench/RESULTS.md); with the group calls they make a third of the loop's host calls and are faster
on the CPU (bench/RESULTS.md, "One Avatar through the passes").

Run eagerly (``avatar_kernel="fused"``) the same functions materialise all K Avatars: that mode
exists to check the compiled one against, not to be used.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from akd_cli.core import counter_rng
from akd_cli.core.losses import BASE_LOSSES
from akd_cli.core.precision import float32_reductions
from akd_cli.core.uncertainty import RELEASE_BN_EPS, inverse_variance_weights, student_under_factor, teacher_channel_spread

_LOG2_E = 1.4426950408889634
# Base losses with a fused teacher side here (their ``teacher_pass``); the others (FGD) keep the loop.
FUSED_BASES = tuple(name for name, loss in BASE_LOSSES.items() if loss.teacher_pass)


def unserved(base: str, perturbation: str) -> Optional[str]:
    """Why these passes cannot compute a setting's Avatars (None when they can): the one check
    behind AKDLoss's refusal and akd's before-anything-runs one."""
    if base not in FUSED_BASES:
        return (f"{base}'s teacher side is not a weighted sum of its Avatars' terms; the passes serve "
                f"{', '.join(FUSED_BASES)} (use loop)")
    if perturbation != "dropout":
        return f"the passes draw dropout Avatars (the paper's), not {perturbation} (use loop)"
    return None


_indices: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def avatar_indices(num_avatars: int, device: torch.device) -> torch.Tensor:
    """0 .. K-1 (int64) on ``device``, made once, for the keys pass (``counter_rng.avatar_keys``,
    compiled: one small kernel instead of some sixty launches of a few elements each). The indices
    come in as a tensor rather than an arange inside the pass because inductor turns arithmetic on
    an arange into an index expression, which Triton evaluates in int32 for small sizes: the hash's
    constants above 2^31 then fail to compile (torch 2.11, Triton 3.6, on an H100: "Scalar
    2654435769 is out of range for type int32"). Loaded from memory, they are int64 values."""
    key = (num_avatars, device)
    if key not in _indices:
        _indices[key] = torch.arange(num_avatars, device=device, dtype=torch.int64)
    return _indices[key]


# How a pass holds the K Avatars (not a user option: both give the same values; bench/core_losses.py
# and bench/compile_time.py time one against the other, ``--avatar-kernels compiled:unrolled``):
# - "stacked": one K x N x C x H x W expression. A compiled reduction's kernel loops over its
#   outputs, and for each over the elements reduced: a per-Avatar statistic's outputs are
#   (Avatar, channel) pairs, so each pair reads and hashes the teacher's elements anew, K times in
#   all.
# - "unrolled": K expressions over one element hash, whose reductions over the same ranges inductor
#   fuses into one loop that reads and hashes each element once for all K (common subexpressions).
#   It compiles 2.8 to 3.9 times as long (CPU, tiny maps, 8 Avatars; MasKD 256 s instead of 65).
# Each base loss's passes (its ``teacher_pass``, and the statistics pass with it) take the layout
# that was faster on an H100 (bench/RESULTS.md, "Both layouts on an NVIDIA H100", commit e8f4a9c:
# release factor, R50-FPN shapes, 8 Avatars, medians of 20): CWD stacked (6.1 ms against 7.1
# unrolled), MSE unrolled (6.9 ms against 10.4), MasKD unrolled (9.3 ms against 13.3; the
# fcos-r101-r50 step, MasKD's, +1.5% over the base loss against +6.4%, inside that run's noise).
# On the CPU (R50-FPN shapes) unrolled was 14% to 43% faster for all three.
LAYOUTS = ("stacked", "unrolled")
PASS_LAYOUTS = {"cwd": "stacked", "mse": "unrolled", "maskd": "unrolled"}
# One of LAYOUTS puts every pass in that layout (benchmarks and tests compare them); None: PASS_LAYOUTS.
LAYOUT: Optional[str] = None


def layout_for(teacher_pass: str) -> str:
    """The layout of a base loss's passes (its ``teacher_pass``). Read on the host and handed to the
    passes as an argument: dynamo specialises on a string argument, so each layout is its own graph."""
    return LAYOUT or PASS_LAYOUTS[teacher_pass]


def avatar_groups(teacher: torch.Tensor, keys, drop: counter_rng.Drop, layout: str) -> List[torch.Tensor]:
    """The K float32 Avatars as G x N x C x H x W groups (virtual when compiled), as ``layout`` holds
    them: one group of K ("stacked"), or K groups of one ("unrolled"). All come from one element hash
    (``counter_rng.element_hash``): each Avatar adds an xor and a multiply to it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    seed_key, key, mult = keys
    hashed = counter_rng.element_hash(teacher.shape, seed_key, counter_rng.hash_bits(key.device))
    t = teacher.float().unsqueeze(0)
    lead = (slice(None),) + (None,) * teacher.dim()
    spans = [(0, key.shape[0])] if layout == "stacked" else [(k, k + 1) for k in range(key.shape[0])]
    return [counter_rng.dropout(t, counter_rng.keep_bits(hashed, key[a:b][lead], mult[a:b][lead], drop), drop)
            for a, b in spans]


def raw_avatars(teacher: torch.Tensor, keys, drop: counter_rng.Drop, layout: str = "stacked") -> torch.Tensor:
    """All K Avatars as one K x N x C x H x W float32 tensor (stored: for checks, not the passes)."""
    return torch.cat(avatar_groups(teacher, keys, drop, layout))


def _total(terms):
    """The sum of a sequence of tensors, left to right (``sum`` would start from a Python 0)."""
    terms = iter(terms)
    total = next(terms)
    for term in terms:
        total = total + term
    return total


def _spans(groups: List[torch.Tensor]):
    """Each group with its Avatars' rows in the K-indexed factors and weights."""
    start = 0
    for a in groups:
        yield a, slice(start, start + a.shape[0])
        start += a.shape[0]


def statistics(teacher: torch.Tensor, keys, drop: counter_rng.Drop,
               sigma: bool, per_avatar_channel: bool, per_image_channel: bool, *, layout: str) -> Dict[str, torch.Tensor]:
    """Pass 1: the raw Avatars' statistics the options need (float32): one loop over the teacher per
    reduction shape."""
    groups = avatar_groups(teacher, keys, drop, layout)
    out = {}
    if sigma:
        t = teacher.float()
        out["sigma_sum"] = _total((a - t).pow(2).sum(dim=(0, 1, 3, 4)) for a in groups)          # C
    if per_avatar_channel:
        # Welford's one-pass mean and biased variance (inductor's var_mean reduction)
        moments = [torch.var_mean(a, dim=(1, 3, 4), correction=0) for a in groups]
        # Concatenated: each group's variance takes a small loop of its own to write (unrolled: one
        # per Avatar), but it is stored. Kept per group (414991b), each Avatar's factor was
        # recomputed at every element of the later passes: MSE's forward +20% on the CPU
        # (bench/RESULTS.md).
        out["mean"] = torch.cat([mean for _, mean in moments])                                 # K x C
        out["var"] = torch.cat([var for var, _ in moments])
    if per_image_channel:
        out["image_channel_mean"] = torch.cat([a.mean(dim=(3, 4)) for a in groups])           # K x N x C
    return out


Affine = Tuple[str, Optional[torch.Tensor], torch.Tensor]


def _seen(a: torch.Tensor, rows: slice, affines: Sequence[Affine]) -> torch.Tensor:
    """A group of Avatars as the base loss takes them: each affine, in turn, maps a -> (a - shift) *
    mult or (a - shift) / div per (Avatar, channel), the loop path's operations in its order."""
    for op, shift, factor in affines:
        a = a - shift[rows][:, None, :, None, None] if shift is not None else a
        factor = factor[rows][:, None, :, None, None]
        a = a * factor if op == "mul" else a / factor
    return a


def _normalised_weights(weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if weights is None else weights / weights.sum(dim=0, keepdim=True)


def _weight(g: Optional[torch.Tensor], rows: slice, k: int, trailing: int):
    """A group's normalised Avatar weights (G x N, then ``trailing`` dimensions of one), or 1 / K
    where all weigh the same (``weights`` None): a constant, not a K x N tensor of ones, which was
    a loop of its own per level in the generated code (a kernel launch on a GPU)."""
    if g is None:
        return 1.0 / k
    w = g[rows]
    return w.view(w.shape + (1,) * trailing)


def cwd_terms(teacher, keys, drop: counter_rng.Drop, affines, weights, tau: float, scale: float, *, layout: str):
    """CWD's phi_bar (N x C x HW) and constant (N, float64): the weighted mean of the Avatars'
    spatial softmaxes, and of sum_c (sum_hw p log p) times the loss's scale."""
    k, g = keys[1].shape[0], _normalised_weights(weights)                                     # K x N or None
    phi_bars, constants = [], []
    for raw, rows in _spans(avatar_groups(teacher, keys, drop, layout)):
        a = _seen(raw, rows, affines)
        logits = a.flatten(3) if tau == 1.0 else a.flatten(3) / tau                            # G x N x C x HW
        top = logits.amax(dim=3, keepdim=True)
        lse = top + torch.log(torch.exp(logits - top).sum(dim=3, keepdim=True))              # G x N x C x 1
        # Each exponential has one consumer: inductor's CPU code stores a reused exp (a K-fold
        # tensor); the entropy's, sum_hw p (logit - lse) = sum_hw p log p, is written with exp2 for
        # that reason.
        phi_bars.append((torch.exp(logits - lse) * _weight(g, rows, k, 2)).sum(dim=0))
        centred = logits - lse
        entropy = (torch.exp2(centred * _LOG2_E) * centred).sum(dim=3)                         # G x N x C
        constants.append((entropy.sum(dim=2) * scale * _weight(g, rows, k, 0)).sum(dim=0))
    return _total(phi_bars), _total(constants).double()


def mse_terms(teacher, keys, drop: counter_rng.Drop, affines, weights, *, layout: str):
    """MSE's (and MGD's, PKD's) phi_bar (N x C x H x W, the weighted mean Avatar) and constant
    (N, float64: the weighted mean of |a_k|^2)."""
    k, g = keys[1].shape[0], _normalised_weights(weights)
    groups = [(_seen(raw, rows, affines), rows) for raw, rows in _spans(avatar_groups(teacher, keys, drop, layout))]
    phi_bar = _total((a * _weight(g, rows, k, 3)).sum(dim=0) for a, rows in groups)
    # The constant as MasKD's: each group's squares summed over positions (N x C outputs: enough
    # for a GPU's reduction not to split), then over Avatars and channels for all groups at once. A
    # reduction over each image per group split in two on a GPU, its second stage a launch per Avatar
    # and level (R50-FPN shapes, 8 Avatars: 40 of MSE's 97 launches; bench/RESULTS.md). At a batch of
    # one, N x C = 256 is under an H100's 264 and level 0 splits per Avatar again.
    squares = torch.cat([a.pow(2).sum(dim=(3, 4)) for a, _ in groups])                         # K x N x C
    constant = (squares * _weight(g, slice(None), k, 1)).sum(dim=(0, 2))
    return phi_bar, constant.double()


def maskd_terms(teacher, keys, drop: counter_rng.Drop, affines, weights, tokens,
                student_masks: Optional[torch.Tensor], *, layout: str):
    """MasKD's accumulator (N x (C+1) x H x W: sum_k g b_k a_k, then sum_k g b_k) and constant
    (N, float64: sum_k g sum_hw b_k |a_k|^2), b_k = sum_t w_t m_t^2 / (c sum_hw m_t).

    What reads the Avatars' elements is done per group (unrolled: one expression per Avatar, over
    one read of the teacher); what comes after, on small or stored tensors (the token weights, the
    masks' sums, the position weights), on all K Avatars' results at once: compiled, each of those
    steps per group was a kernel launch per Avatar on a GPU."""
    token = tokens.mask_token.float()                                                          # T x C
    g = _normalised_weights(weights)
    groups = [(_seen(raw, rows, affines), rows) for raw, rows in _spans(avatar_groups(teacher, keys, drop, layout))]
    k, (n, c, h, w) = keys[1].shape[0], teacher.shape
    # The window sums' sums over rows per group, in one read of the teacher for all; their edge rows,
    # a sliver of each map, as one K-stacked expression (per group, a cat of K copies).
    stacked = _seen(avatar_groups(teacher, keys, drop, "stacked")[0], slice(None), affines)
    windows = tokens.windows_of_sums(torch.cat([a.sum(dim=3) for a, _ in groups]).flatten(0, 1),
                                     stacked[..., 0, :].flatten(0, 1), stacked[..., -1, :].flatten(0, 1))
    # The token weights of every group in one call of the head's products: per group, they would be
    # two external kernels (a matrix product and a convolution) per group and level in the graph.
    token_weights = tokens.weights_of_windows(windows, h * w).float().view(k, n, -1)           # K x N x T
    # A broadcast sum, not an einsum: a matrix product would make inductor store the Avatars.
    # The sigmoid after the cat: the groups' reductions are then written into the cat's slices, not
    # stored apart and copied.
    masks = torch.sigmoid(torch.cat([(a.unsqueeze(2) * token[None, None, :, :, None, None]).sum(dim=3)
                                     for a, _ in groups]))                                     # K x N x T x H x W
    if student_masks is not None:
        masks = masks * student_masks.unsqueeze(0)
    per_token = token_weights / (c * masks.sum(dim=(3, 4)))
    position = (masks.pow(2) * per_token[..., None, None]).sum(dim=2, keepdim=True)            # K x N x 1 x H x W
    share = position * _weight(g, slice(None), k, 3)
    weighted = _total((a * share[rows]).sum(dim=0) for a, rows in groups)
    # The constant in two reductions for all groups: over positions per group (one read of the
    # teacher for all), then over Avatars and channels. A reduction over each image per group left
    # the second stage of each (split) reduction a launch of its own; the K groups' terms summed
    # before one reduction made inductor store a partial sum, a map's size; a reduction over
    # channels first was 9% slower on the CPU (bench/RESULTS.md).
    constants = torch.cat([(a.pow(2) * share[rows]).sum(dim=(3, 4)) for a, rows in groups]).sum(dim=(0, 2))
    return torch.cat([weighted, share.sum(dim=0)], dim=1), constants.double()


def wanted_statistics(sigma: bool, standardised: bool, pearson: bool, weighting: str) -> Dict[str, bool]:
    """Which statistics of the raw Avatars a setting needs (``statistics``' flags): the paper's sum
    for its sigma; per-(Avatar, channel) moments for the release's standardisation (``standardised``:
    the base loss standardises its Avatars) or PKD's normalisation (``pearson``); per-(Avatar, image,
    channel) means for the inverse-variance weights."""
    return dict(sigma=sigma, per_avatar_channel=standardised or pearson, per_image_channel=weighting == "inverse_variance")


def pearson_affine(mean: torch.Tensor, var: torch.Tensor, count: int, affines: Sequence[Affine]) -> Affine:
    """PKD's normalisation of the Avatars as seen (each channel to zero mean and unit unbiased
    std), from the raw Avatars' moments through the affines before it: ("div", mean', std' + 1e-6)."""
    for op, shift, factor in affines:
        mean = mean - shift if shift is not None else mean
        mean, var = (mean * factor, var * factor ** 2) if op == "mul" else (mean / factor, var / factor ** 2)
    std = torch.sqrt(var * (count / max(count - 1, 1)))
    return ("div", mean, std + 1e-6)


def teacher_terms(teacher: torch.Tensor, keys, scale: Optional[torch.Tensor], stats: Optional[Dict[str, torch.Tensor]],
                  extra: tuple, *, drop: counter_rng.Drop, teacher_pass: str, standardised: bool, pearson: bool,
                  weighting: str, layout: str):
    """A level's whole teacher side, from its Avatars' keys to its base loss's terms
    (``FUNCTIONS[teacher_pass]``): the statistics the setting needs (unless ``stats`` brings them: the
    paper's factor takes its sum in a call of its own, before its all-reduce), the factor as
    affines, the weights, the terms. In one compiled call, where the host made some twenty eager
    calls per level around the passes before (the factor's and weights' small tensors): on a GPU
    the loss is bound by that host work (bench/RESULTS.md).

    The keys come in as tensors, computed by a call of their own (``counter_rng.avatar_keys``, all
    levels at once). Computed here, inductor inlined their hash into each Avatar element's
    expression (the thresholds of COMPILE_OPTIONS let it), and one configuration took minutes to
    compile where it had taken 40 s.

    ``scale``: the paper's 1 / sigma (1 x C x 1 x 1, in the student's dtype, as the loop multiplies
    its Avatars by it), or None. ``standardised``: the release's factor standardises this base
    loss's Avatars. ``pearson``: the base loss normalises its teacher (PKD). ``extra``: the base
    loss's own arguments (CWD: tau and scale; MasKD: its tokens and the student's masks or None)."""
    k, (n, c, h, w) = keys[1].shape[0], teacher.shape
    if stats is None:
        stats = statistics(teacher, keys, drop, **wanted_statistics(False, standardised, pearson, weighting), layout=layout)
    affines: List[Affine] = []
    if scale is not None:
        affines.append(("mul", None, scale.reshape(1, c).expand(k, c)))
    elif standardised:
        affines.append(("div", stats["mean"], torch.sqrt(stats["var"] + RELEASE_BN_EPS)))
    if pearson:
        affines.append(pearson_affine(stats["mean"], stats["var"], n * h * w, affines))
    weights = None  # the Avatars weigh the same
    if weighting == "inverse_variance":
        weights = inverse_variance_weights(stats["image_channel_mean"], *teacher_channel_spread(teacher))
    return FUNCTIONS[teacher_pass](teacher, keys, drop, affines, weights, *extra, layout=layout)


# Inductor stores ("realises") a pointwise expression of more than 30 operations (50 on the CPU),
# or with more than 8 (12) buffer reads, even when it has a single consumer, and one with more than
# 4 reads that has two consumers. The Avatar expression, dropout and factor included, is about 20
# operations: inlining it is cheaper than storing a K-fold tensor, and none of these expressions
# fans out deeply enough for inlining to grow exponentially.
COMPILE_OPTIONS = {"realize_opcount_threshold": 100, "realize_acc_reads_threshold": 32, "realize_reads_threshold": 16}
# Inductor's combo kernels: a graph's kernels that do not depend on each other (each level's, in a
# group of levels) launched as one. In Triton's code form at R50-FPN shapes they cut CWD's launches
# per loss call from 68 to 30 with 8 Avatars (bench/RESULTS.md). Off until a GPU has timed them: a combo kernel's
# blocks take the largest member's sizes, and whether fewer launches pay for that is a GPU's to say.
# True compiles the passes with them (benchmarks: ``compiled+combo``); set before the first call.
COMBO_KERNELS = False


# One function per pass, each its own code object: dynamo keeps its compilations per code object,
# and one closure over each pass would make the passes share one recompile limit.
def statistics_levels(arguments: list, keywords: dict) -> list:
    return [FUNCTIONS["statistics"](*level, **keywords) for level in arguments]


def student_side(bases: list, prepared: list, terms: list, dtypes: list) -> list:
    """Each level's loss from its student and its Avatars' terms: the base loss's own ``fused``,
    the loop path's code (the student's gradient flows through it). The student comes as its base
    loss prepared it, or, where the base loss's preparation is pure (``prepares_in_passes``), as
    (student, scale, factor) to be prepared here: in a compiled call, the release's standardisation
    and CWD's log-softmax are then kernels of the group's graph, not host calls of their own."""
    losses = []
    for base, ready, (phi_bar, constant), dtype in zip(bases, prepared, terms, dtypes):
        if base.prepares_in_passes:
            ready = base.prepare_student(student_under_factor(*ready))
        if base.teacher_pass != "maskd":  # the dtype the loop's accumulator is cast back to
            phi_bar = phi_bar.to(dtype)
        losses.append(base.fused(ready, phi_bar, constant).sum())
    return losses


def group_losses(bases: list, prepared: list, arguments: list, keywords: dict, dtypes: list, teacher_pass: str) -> list:
    """The losses of a group of levels: each level's whole teacher side (``teacher_terms``: its
    positional arguments in ``arguments``, those all levels share in ``keywords``), then its student
    side (``student_side``). Compiled, a group is one call forward and one backward: eagerly, each
    level's teacher side made some twenty host calls and its student side fifteen forward and eight
    backward, host work a GPU step waits on. No gradient flows into the teacher side, and its
    reductions stay in float32 under autocast, as the loop's do."""
    with torch.no_grad(), float32_reductions(arguments[0][0]):
        terms = [FUNCTIONS["terms"](*level, teacher_pass=teacher_pass, **keywords) for level in arguments]
    return student_side(bases, prepared, terms, dtypes)


# One code object per pass here too, so that each keeps its own recompile limit.
def cwd_group(bases: list, prepared: list, arguments: list, keywords: dict, dtypes: list) -> list:
    return group_losses(bases, prepared, arguments, keywords, dtypes, "cwd")


def mse_group(bases: list, prepared: list, arguments: list, keywords: dict, dtypes: list) -> list:
    return group_losses(bases, prepared, arguments, keywords, dtypes, "mse")


def maskd_group(bases: list, prepared: list, arguments: list, keywords: dict, dtypes: list) -> list:
    return group_losses(bases, prepared, arguments, keywords, dtypes, "maskd")


FUNCTIONS = {"keys": counter_rng.avatar_keys, "statistics": statistics,
             "terms": teacher_terms, "cwd": cwd_terms, "mse": mse_terms, "maskd": maskd_terms,
             "statistics_levels": statistics_levels, "cwd_group": cwd_group, "mse_group": mse_group,
             "maskd_group": maskd_group}
RECOMPILE_LIMIT = 64
_compiled: Dict[str, object] = {}


def levels(name: str, compiled: bool):
    """The pass ``name`` over several levels in one call, ``f(arguments, keywords)``: ``arguments``
    holds each level's positional arguments, ``keywords`` those all levels share. Each call of a
    compiled function costs host time (guards, wrappers, launches: 100 to 250 us on an H100's host),
    and the loss is bound by the host: one call for several levels instead of one per level. One
    graph holds every level's kernels (each level's sizes their own symbols); it compiles once per
    level count."""
    return function(name + "_levels", compiled)


def function(name: str, compiled: bool):
    """The pass ``name``, compiled once per process (dynamic shapes: one compilation serves every
    level and image size)."""
    if not compiled:
        return FUNCTIONS[name]
    key = name + "+combo" if COMBO_KERNELS else name
    if key not in _compiled:
        from torch._inductor import config

        # a torch without one of these settings refuses the whole dict: keep what it knows
        wanted = dict(COMPILE_OPTIONS, combo_kernels=True) if COMBO_KERNELS else COMPILE_OPTIONS
        options = {key: value for key, value in wanted.items() if hasattr(config, key)}
        # A process compiles each pass once per configuration (level count, factor, weighting,
        # dtype, a batch of one): a test run or a study meets more of them than dynamo's default
        # limit of 8 per function, past which a fullgraph function fails instead of recompiling.
        from torch._dynamo import config as dynamo

        for limit in ("recompile_limit", "cache_size_limit"):  # the name before torch 2.6
            if hasattr(dynamo, limit):
                setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
                break
        # Duck sizing gives two sizes that happen to be equal at the first call one symbol, and
        # guards on their equality: on FPN maps, a level's height equal to another's width, to the
        # channels or to the Avatar count. A detector's padded batch shape changes from batch to
        # batch, and with it which sizes coincide: a batch without the first one's coincidences
        # was a recompilation, of seconds. Without it, one graph per configuration serves every
        # shape (tests/test_fused.py). Process-wide, as the limit is: other compiled code only
        # loses the assumption that sizes equal once stay equal.
        from torch.fx.experimental import _config as fx_config

        fx_config.use_duck_shape = False
        # Its own torch.compile with its own options: dynamo guards each compilation on the backend
        # that made it, so switching COMBO_KERNELS compiles again instead of reusing the other's graph.
        _compiled[key] = torch.compile(FUNCTIONS[name], dynamic=True, fullgraph=True, options=options)
    return _compiled[key]

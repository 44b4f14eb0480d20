"""The pure-torch AKD core: values, equivalences, gradients, determinism, cost and bad input."""
import math
import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

from akd_cli import AKDLoss
from akd_cli.core import BASE_LOSSES, make_avatar
from akd_cli.core.akd import _all_finite
from akd_cli.core.losses import CWDLoss, FGDLoss, MasKDLoss, MGDLoss, MSELoss, PKDLoss
from akd_cli.core.uncertainty import avatar_uncertainty, standardise

CHANNELS, LEVELS = 8, 2


def base_kwargs(base):
    return {"channels": CHANNELS, "num_levels": LEVELS} if BASE_LOSSES[base].needs_channels else {}


def context(base, n=2):
    if base != "fgd":
        return {}
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 20.0]]), torch.tensor([[0.0, 10.0, 16.0, 40.0], [20, 2, 38, 12]])]
    return {"gt_bboxes": boxes[:n], "img_shape": (48, 40)}


def features(seed=0, n=2, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, CHANNELS, 12, 10), (n, CHANNELS, 6, 5)]
    student = [torch.randn(s, generator=g).requires_grad_(requires_grad) for s in shapes]
    teacher = [torch.randn(s, generator=g) * 2 + 0.5 for s in shapes]
    return student, teacher


# --- hand-computed values ----------------------------------------------------------------------

def test_cwd_matches_hand_computed_kl():
    student = torch.zeros(1, 1, 1, 2)
    teacher = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert CWDLoss(tau=1.0, loss_weight=1.0)(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    # tau = 2: softmax of [0, ln 3] / 2 is [1, sqrt 3] / (1 + sqrt 3); times tau^2 and the weight 3
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    expected_tau2 = 3 * 4 * sum(pi * math.log(pi / 0.5) for pi in p)
    assert CWDLoss(tau=2.0, loss_weight=3.0)(student, teacher).item() == pytest.approx(expected_tau2, rel=1e-5)


def test_cwd_divides_by_images_and_channels():
    student = torch.zeros(2, 3, 1, 2)
    teacher = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2).expand(2, 3, 1, 2)
    per_pair = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert CWDLoss(loss_weight=1.0)(student, teacher).item() == pytest.approx(per_pair, rel=1e-5)


def test_mse_matches_hand_computed_value():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert MSELoss(loss_weight=2.0)(student, torch.zeros_like(student)).item() == pytest.approx(15.0)


def test_pkd_matches_hand_computed_value():
    student = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)   # mean 2, std 1 -> [-1, 0, 1]
    teacher = torch.tensor([1.0, 1.0, 4.0]).view(1, 1, 1, 3)   # mean 2, std sqrt 3
    r3 = math.sqrt(3.0)
    normalised_teacher = [-1 / r3, -1 / r3, 2 / r3]
    mse = sum((a - b) ** 2 for a, b in zip([-1, 0, 1], normalised_teacher)) / 3
    assert PKDLoss(loss_weight=4.0)(student, teacher).item() == pytest.approx(4.0 * mse / 2, rel=1e-5)


def _identity_generation(mgd):
    with torch.no_grad():
        for conv in (mgd.generation[0], mgd.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 1, 1] = 1.0


def test_mgd_matches_hand_computed_value_with_identity_generation():
    mgd = MGDLoss(channels=2, alpha_mgd=0.5, lambda_mgd=0.0)
    _identity_generation(mgd)
    student = torch.rand(2, 2, 3, 3) + 0.1                     # positive: the ReLU keeps it
    teacher = torch.randn(2, 2, 3, 3)
    expected = 0.5 * ((student - teacher) ** 2).sum().item() / 2
    assert mgd(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_mgd_masks_positions_with_probability_lambda():
    mgd = MGDLoss(channels=2, alpha_mgd=1.0, lambda_mgd=0.5)
    _identity_generation(mgd)
    student, teacher = torch.rand(1, 2, 4, 4) + 0.1, torch.zeros(1, 2, 4, 4)
    torch.manual_seed(3)
    keep = (torch.rand(1, 1, 4, 4) >= 0.5).float()
    torch.manual_seed(3)
    assert mgd(student, teacher).item() == pytest.approx(((student * keep) ** 2).sum().item(), rel=1e-5)


def _maskd_as_published(student, teacher, tokens, loss_weight):
    """MasKD's distillation loss written out as its paper and code state it, loop by loop."""
    n, c, h, w = teacher.shape
    total = 0.0
    for i in range(n):
        t, s = teacher[i], student[i]
        weights = tokens.weights(teacher[i:i + 1])[0]
        for k in range(tokens.num_tokens):
            m = torch.sigmoid((tokens.mask_token[k][:, None, None] * t).sum(0))           # H x W
            squared = ((m * s - m * t) ** 2).sum(dim=(1, 2)) / m.sum()                    # per channel
            total = total + weights[k] * squared.mean()
    return loss_weight * total / n


@pytest.mark.parametrize("weighted", [True, False])
def test_maskd_matches_the_published_formula(weighted):
    torch.manual_seed(0)
    loss = MasKDLoss(channels=3, num_tokens=4, loss_weight=10.0, weight_tokens=weighted)
    with torch.no_grad():
        loss.tokens.mask_token.normal_()  # masks far from 1/2, so a wrong power or sum would show
    student, teacher = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    expected = _maskd_as_published(student, teacher, loss.tokens, 10.0)
    assert loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_maskd_with_zero_tokens_and_uniform_weights_is_a_quarter_of_the_mean_error():
    loss = MasKDLoss(channels=2, num_tokens=1, loss_weight=2.0, weight_tokens=False)
    with torch.no_grad():
        loss.tokens.mask_token.zero_()  # sigmoid(0) = 1/2 everywhere: (m e)^2 / sum m = e^2 / 2 / HW
    student, teacher = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    expected = 2.0 * 0.5 * ((student - teacher) ** 2).mean().item()
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_maskd_student_masks_join_after_the_warm_up():
    loss = MasKDLoss(channels=2, num_tokens=2, weight_tokens=False, student_masks_after=2)
    student, teacher = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    before = [loss(student, teacher).item() for _ in range(2)]
    after = loss(student, teacher).item()
    assert before[0] == before[1] and after != pytest.approx(before[0]) and int(loss.calls) == 3


@pytest.mark.parametrize("loader", ["torch", "mmcv"])
def test_maskd_warm_up_count_survives_a_loaded_state(loader):
    """The count is read on the host once, then kept there: a loaded state (a resumed run) must
    replace it, or a resumed run would start its warm-up over."""
    trained = MasKDLoss(channels=2, num_tokens=2, weight_tokens=False, student_masks_after=2)
    student, teacher = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    for _ in range(3):
        trained(student, teacher)
    resumed = MasKDLoss(channels=2, num_tokens=2, weight_tokens=False, student_masks_after=2)
    first = resumed(student, teacher).item()          # the count is now on the host: 1
    if loader == "torch":
        resumed.load_state_dict(trained.state_dict())  # 3 calls made: the next one uses student masks
    else:
        pytest.importorskip("mmcv")
        from mmcv.runner.checkpoint import load_state_dict

        load_state_dict(resumed, trained.state_dict(), strict=True)   # what mmcv's resume calls
    assert resumed(student, teacher).item() == pytest.approx(trained(student, teacher).item())
    assert resumed(student, teacher).item() != pytest.approx(first) and int(resumed.calls) == 5


@pytest.mark.parametrize("student_masks_after", [None, 0])
def test_maskd_avatars_fused_through_position_weights_equal_the_loop(student_masks_after):
    """MasKD's masks depend on each Avatar, yet per position its loss is a weighted squared error:
    the fused Avatars give the loop's value and gradient, with the student's masks too."""
    student, teacher = features()
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        akd = AKDLoss(base="maskd", num_avatars=5, drop_rate=0.3, fused=fused, channels=CHANNELS, num_levels=LEVELS,
                      num_tokens=3, student_masks_after=student_masks_after, align=True)
        with torch.no_grad():
            for base in akd.base_losses:
                base.tokens.mask_token.normal_()  # masks far from 1/2 and unlike each other
        torch.manual_seed(1)
        loss = akd(student, teacher)
        results.append((loss.item(), torch.autograd.grad(loss, student + [akd.base_losses[0].align.weight])))
    (fused_value, fused_grads), (loop_value, loop_grads) = results
    assert fused_value == pytest.approx(loop_value, rel=1e-5)
    for g_fused, g_loop in zip(fused_grads, loop_grads):
        assert torch.allclose(g_fused, g_loop, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 5, 1, 1), (2, 5, 1, 6), (2, 5, 6, 1), (2, 5, 2, 2)])
def test_token_weights_take_the_pooled_convolution_exactly_without_running_it(shape):
    """ReceptiveTokens.weights computes head(pool(conv3x3(x))) from nine window sums of x: the same
    values and gradients (input and the head's parameters) as running MasKD's layers, edges included."""
    from akd_cli.core.tokens import ReceptiveTokens

    torch.manual_seed(0)
    tokens = ReceptiveTokens(shape[1], num_tokens=4)
    with torch.no_grad():
        for conv in (tokens.prob[0], tokens.prob[2]):
            conv.bias.normal_()
    x = (torch.randn(shape) * 3 + 1).requires_grad_(True)
    inputs = [x] + list(tokens.prob.parameters())
    got = tokens.weights(x)
    expected = torch.softmax(tokens.prob(x).flatten(1), dim=1)  # the layers as MasKD runs them
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    probe = torch.randn(got.shape)
    for g_got, g_expected in zip(torch.autograd.grad((got * probe).sum(), inputs),
                                 torch.autograd.grad((expected * probe).sum(), inputs)):
        assert torch.allclose(g_got, g_expected, rtol=1e-4, atol=1e-6)


def test_token_files_round_trip_per_level_and_in_the_released_layout(tmp_path):
    from akd_cli.core.tokens import ReceptiveTokens, token_file_state

    torch.manual_seed(1)
    learnt = [ReceptiveTokens(3, 4), ReceptiveTokens(3, 4)]
    ours = tmp_path / "tokens.pth"
    torch.save(token_file_state(learnt, meta={"iters": 10}), ours)
    released = tmp_path / "released.pth"  # MasKD's files keep the tokens inside the whole model's keys
    torch.save({"state_dict": {f"distiller.losses.loss_maskd_fpn.{k}": v
                               for k, v in token_file_state(learnt)["state_dict"].items()}}, released)
    for path in (ours, released):
        akd = AKDLoss(base="maskd", num_avatars=0, channels=[3, 3], num_tokens=4, token_file=str(path))
        for level, base in enumerate(akd.base_losses):
            assert torch.equal(base.tokens.mask_token, learnt[level].mask_token)
            assert torch.equal(base.tokens.prob[2].weight, learnt[level].prob[2].weight)
            assert not any(p.requires_grad for p in base.tokens.parameters()), "tokens stay fixed"


def test_maskd_token_files_that_do_not_fit_are_refused(tmp_path):
    from akd_cli.core.tokens import ReceptiveTokens, token_file_state

    path = tmp_path / "tokens.pth"
    torch.save(token_file_state([ReceptiveTokens(5, 3)]), path)
    with pytest.raises(ValueError, match=r"have shape \(3, 5\), expected \(1, 2\)"):
        MasKDLoss(channels=2, num_tokens=1, token_file=str(path))
    with pytest.raises(ValueError, match=r"not for level 1"):
        MasKDLoss(channels=5, num_tokens=3, token_file=str(path), level=1)
    torch.save(torch.zeros(3, 5), path)
    with pytest.raises(ValueError, match="no state dict of receptive tokens"):
        MasKDLoss(channels=5, num_tokens=3, token_file=str(path))
    torch.save(token_file_state([ReceptiveTokens(5, 3, weighted=False)]), path)
    with pytest.raises(ValueError, match="weight_tokens=False"):
        MasKDLoss(channels=5, num_tokens=3, token_file=str(path))
    MasKDLoss(channels=5, num_tokens=3, token_file=str(path), weight_tokens=False)


def test_dice_overlap_of_disjoint_and_of_equal_masks():
    from akd_cli.core.tokens import dice_overlap

    disjoint = torch.zeros(1, 2, 2, 2)
    disjoint[0, 0, 0], disjoint[0, 1, 1] = 1.0, 1.0
    assert dice_overlap(disjoint).item() == pytest.approx(0.0)
    assert dice_overlap(torch.rand(1, 1, 2, 2).repeat(1, 3, 1, 1)).item() == pytest.approx(1.0)


def test_receptive_tokens_mask_the_feature_by_their_weighted_coverage():
    from akd_cli.core.tokens import ReceptiveTokens

    tokens = ReceptiveTokens(3, 2)
    x = torch.randn(2, 3, 4, 4)
    masked, overlap = tokens(x)
    coverage = (tokens.masks(x) * tokens.weights(x)[:, :, None, None]).sum(dim=1, keepdim=True)
    assert torch.allclose(masked, x * coverage, atol=1e-6) and 0.0 <= overlap.item() <= 1.0
    assert torch.allclose(tokens.weights(x).sum(dim=1), torch.ones(2))


def test_fgd_foreground_and_background_masks():
    fgd = FGDLoss(channels=1)
    fg, bg = fgd._masks(torch.zeros(1, 1, 4, 4), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], (8, 8))
    # box covers input pixels 0..4 of 8 -> feature cells 0..2 of 4: a 3 x 3 region of area 1/9
    assert torch.allclose(fg[0, :3, :3], torch.full((3, 3), 1 / 9))
    assert fg[0, 3].sum() == 0 and fg[0, :, 3].sum() == 0
    assert torch.allclose(bg[0][fg[0] == 0], torch.full((7,), 1 / 7))


def test_fgd_feature_terms_match_hand_computed_value():
    fgd = FGDLoss(channels=3, alpha_fgd=2.0, beta_fgd=0.5, gamma_fgd=0.0, lambda_fgd=0.0)
    teacher = torch.ones(1, 3, 4, 4)             # uniform attention: every weight is 1
    student = teacher + 1.0                      # unit error everywhere
    ctx = {"gt_bboxes": [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], "img_shape": (8, 8)}
    # foreground: C * (9 cells * 1/9), background: C * (7 cells * 1/7)
    assert fgd(student, teacher, **ctx).item() == pytest.approx(2.0 * 3 + 0.5 * 3, rel=1e-5)


def test_fgd_needs_boxes():
    with pytest.raises(ValueError, match="gt_bboxes"):
        AKDLoss(base="fgd", channels=CHANNELS, num_levels=LEVELS)(*features())


# --- equivalences -------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["mse", "mgd", "pkd"])
def test_one_teachers_squared_error_is_the_fused_form_bit_for_bit(base):
    """MSE, MGD and PKD take one teacher (the plain loss, one Avatar) without the fused form's spread,
    which is exactly 0 there: the same values and gradients, to the bit."""
    student, teacher = features()
    loss = AKDLoss(base=base, num_avatars=0, **base_kwargs(base)).base_losses[0]
    torch.manual_seed(0)
    prepared = loss.prepare_student(student[0])
    direct = loss.per_image(prepared, teacher[0])
    fused = loss.fused(prepared, *loss.target(prepared, teacher[0]))
    assert torch.equal(direct, fused)
    upstream = torch.rand(direct.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.autograd.grad(direct, student[0], upstream, retain_graph=True)[0],
                       torch.autograd.grad(fused, student[0], upstream)[0])


@pytest.mark.parametrize("base", sorted(BASE_LOSSES))
def test_no_avatars_is_the_plain_base_loss(base):
    student, teacher = features()
    torch.manual_seed(0)
    akd = AKDLoss(base=base, num_avatars=0, **base_kwargs(base))
    torch.manual_seed(0)
    plain = AKDLoss(base=base, num_avatars=0, **base_kwargs(base)).base_losses
    torch.manual_seed(5)
    got = akd(student, teacher, **context(base))
    torch.manual_seed(5)
    expected = sum(plain[i if len(plain) > 1 else 0](s, t, **context(base))
                   for i, (s, t) in enumerate(zip(student, teacher)))
    assert torch.allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("base", sorted(BASE_LOSSES))
@pytest.mark.parametrize("uncertainty, weighting", [("paper", "mean"), ("none", "inverse_variance"), ("none", "mean")])
@pytest.mark.parametrize("num_avatars", [1, 3, 8])
def test_drop_rate_zero_equals_the_base_loss(base, uncertainty, weighting, num_avatars):
    student, teacher = features()
    torch.manual_seed(0)
    akd = AKDLoss(base=base, num_avatars=num_avatars, drop_rate=0.0, uncertainty=uncertainty, weighting=weighting,
                  **base_kwargs(base))
    plain = AKDLoss(base=base, num_avatars=0, **base_kwargs(base))
    plain.base_losses.load_state_dict(akd.base_losses.state_dict())
    torch.manual_seed(1)
    got = akd(student, teacher, **context(base))
    torch.manual_seed(1)
    assert torch.allclose(got, plain(student, teacher, **context(base)), rtol=1e-5, atol=1e-7)


# --- the release's factor, against a transcription of its formulas -----------------------------
# Gumpest/AvatarKD:mmrazor/models/losses/akd_{cwd,mgd,maskd}.py, written out again on small tensors.

def _release_bn(x):
    """nn.BatchNorm2d(C, affine=False) in training mode: batch mean, biased variance, eps 1e-5."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def test_release_cwd_standardises_the_student_and_keeps_the_avatar_raw():
    import torch.nn.functional as F

    student, teacher = features()
    torch.manual_seed(3)
    got = AKDLoss(base="cwd", num_avatars=1, drop_rate=0.1, uncertainty="release", tau=2.0, loss_weight=3.0)(
        student, teacher)
    torch.manual_seed(3)
    expected = 0.0
    for s, t in zip(student, teacher):
        n, c, h, w = s.shape
        multi_t = F.dropout(t, p=0.1, training=True)
        s = _release_bn(s)
        p_t = F.softmax(multi_t.reshape(-1, h * w) / 2.0, dim=1)
        cost = torch.sum(p_t * F.log_softmax(multi_t.reshape(-1, h * w) / 2.0, dim=1)
                         - p_t * F.log_softmax(s.reshape(-1, h * w) / 2.0, dim=1)) * 2.0 ** 2
        expected = expected + cost / (c * n)
    assert got.item() == pytest.approx(3.0 * expected.item(), rel=1e-5)


def test_release_mgd_standardises_student_and_avatar_before_generation():
    import torch.nn.functional as F

    student, teacher = features()
    torch.manual_seed(0)
    akd = AKDLoss(base="mgd", num_avatars=1, drop_rate=0.1, uncertainty="release", channels=CHANNELS,
                  num_levels=LEVELS, alpha_mgd=2e-5, lambda_mgd=0.0)
    torch.manual_seed(5)
    got = akd(student, teacher)
    torch.manual_seed(5)
    expected = 0.0
    for level, (s, t) in enumerate(zip(student, teacher)):
        n, _, h, w = t.shape
        torch.rand((n, 1, h, w))  # akd draws MGD's mask first; at lambda 0 it keeps every position
        a = _release_bn(F.dropout(t, p=0.1, training=True))
        generated = akd.base_losses[level].generation(_release_bn(s))
        expected = expected + ((generated - a) ** 2).sum() / n
    assert got.item() == pytest.approx(2e-5 * expected.item(), rel=1e-5)


@pytest.mark.parametrize("after", [None, 0])
def test_release_maskd_aligns_then_standardises_and_masks_from_the_standardised_avatar(after):
    import torch.nn.functional as F

    student, teacher = features()
    torch.manual_seed(0)
    akd = AKDLoss(base="maskd", num_avatars=1, drop_rate=0.1, uncertainty="release", channels=CHANNELS,
                  num_levels=LEVELS, num_tokens=3, loss_weight=7.0, align=True, student_masks_after=after)
    torch.manual_seed(9)
    got = akd(student, teacher)
    torch.manual_seed(9)
    expected = 0.0
    for level, (s, t) in enumerate(zip(student, teacher)):
        loss = akd.base_losses[level]
        y_s = _release_bn(loss.align(s))
        y_t = _release_bn(F.dropout(t, p=0.1, training=True))
        mask = loss.tokens.masks(y_t)                                        # N x T x H x W
        if after is not None:
            mask = mask * loss.tokens.masks(y_s.detach())
        masked = (y_s.unsqueeze(1) * mask.unsqueeze(2) - y_t.unsqueeze(1) * mask.unsqueeze(2)) ** 2
        per_token = masked.sum((3, 4)) / mask.sum((2, 3)).unsqueeze(-1)         # N x T x C
        expected = expected + (per_token.mean(-1) * loss.tokens.weights(y_t)).sum(-1).mean()
    assert got.item() == pytest.approx(7.0 * expected.item(), rel=1e-5)


def test_standardise_is_the_releases_batchnorm_forward_and_backward():
    """The release's nn.BatchNorm2d(C, affine=False) in training mode, values and gradients."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, CHANNELS, 7, 5, generator=g) * 4 + 1).requires_grad_()
    ours = standardise(x)
    theirs = torch.nn.BatchNorm2d(CHANNELS, affine=False).train()(x)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ours, _release_bn(x), rtol=1e-5, atol=1e-6)
    upstream = torch.randn(x.shape, generator=g)
    got, = torch.autograd.grad(ours, x, upstream)
    expected, = torch.autograd.grad(_release_bn(x), x, upstream)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base", ["cwd", "mgd", "maskd"])
def test_release_factor_on_one_value_per_channel(base):
    """One image and a 1 x 1 map (a small image's coarsest level): the formula's 0, where batch norm
    in training mode refuses a single value per channel."""
    x = torch.randn(1, CHANNELS, 1, 1, requires_grad=True)
    out = standardise(x)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    student, teacher = features(n=1)
    student.append(torch.randn(1, CHANNELS, 1, 1, requires_grad=True))
    teacher.append(torch.randn(1, CHANNELS, 1, 1))
    akd = AKDLoss(base=base, num_avatars=1, uncertainty="release",
                  **({"channels": CHANNELS, "num_levels": 3} if BASE_LOSSES[base].needs_channels else {}))
    loss = akd(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s.grad).all() for s in student)


@pytest.mark.parametrize("base", ["mgd", "maskd", "mse", "pkd", "cwd"])
def test_release_factor_ignores_the_students_scale_and_shift(base):
    """The student is standardised per channel: a positive per-channel affine map of it changes nothing."""
    student, teacher = features()
    scale = [torch.rand(1, CHANNELS, 1, 1) * 3 + 0.5 for _ in student]
    shifted = [s * k + 2.0 for s, k in zip(student, scale)]
    values = []
    for feats in (student, shifted):
        torch.manual_seed(0)
        akd = AKDLoss(base=base, num_avatars=2, uncertainty="release", **base_kwargs(base))
        torch.manual_seed(1)
        values.append(akd(feats, teacher, **context(base)).item())
    assert values[0] == pytest.approx(values[1], rel=1e-3)


# --- the paper's factor -------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_paper_sigma_is_the_dropout_closed_form(p):
    """sigma_c^2 = E[(a - T)_c^2] = p / (1 - p) * E[T_c^2] for element-wise dropout of rate p."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 6, 48, 48, generator=g) * torch.arange(1.0, 7.0).view(1, 6, 1, 1) + 0.5
    student = torch.randn_like(teacher, requires_grad=True)
    akd = AKDLoss(base="mse", num_avatars=4, drop_rate=p, uncertainty="paper", channels=6, num_levels=1)
    torch.manual_seed(0)
    akd(student, teacher)
    closed_form = (p / (1 - p) * teacher.pow(2).mean(dim=(0, 2, 3))).sqrt()
    assert torch.allclose(akd.running_sigma(0), closed_form, rtol=0.03)


def test_paper_factor_divides_avatars_and_student_by_the_batch_sigma():
    """The paper's L = E_k L_distill(a_k / sigma, S / sigma), written out: sigma from this step's
    Avatars (the running estimate's first value), the same Avatars in the loss."""
    student, teacher = features()
    torch.manual_seed(2)
    got = AKDLoss(base="cwd", num_avatars=3, drop_rate=0.2, uncertainty="paper")(student, teacher)
    torch.manual_seed(2)
    expected = 0.0
    for s, t in zip(student, teacher):
        state = torch.random.get_rng_state()
        avatars = [make_avatar(t, "dropout", 0.2) for _ in range(3)]
        sigma2 = torch.stack([(a - t).pow(2).mean(dim=(0, 2, 3)) for a in avatars]).mean(0)
        sigma = torch.sqrt(sigma2 + 1e-6 * sigma2.mean()).view(1, -1, 1, 1)
        torch.random.set_rng_state(state)
        avatars = [make_avatar(t, "dropout", 0.2) for _ in range(3)]
        expected = expected + sum(CWDLoss()(s / sigma, a / sigma) for a in avatars) / 3
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("base", ["mse", "mgd", "maskd", "cwd"])
def test_paper_factor_is_invariant_to_a_common_per_channel_scale(base):
    """sigma scales with the features: scaling teacher and student by the same positive per-channel
    factor leaves a / sigma and S / sigma, hence the loss, unchanged."""
    student, teacher = features()
    scale = [torch.rand(1, CHANNELS, 1, 1) * 4 + 0.25 for _ in student]
    values = []
    for k in (None, scale):
        s_in = student if k is None else [s * f for s, f in zip(student, k)]
        t_in = teacher if k is None else [t * f for t, f in zip(teacher, k)]
        torch.manual_seed(0)
        akd = AKDLoss(base=base, num_avatars=2, drop_rate=0.2, uncertainty="paper", **base_kwargs(base))
        torch.manual_seed(1)
        values.append(akd(s_in, t_in).item())
    assert values[0] == pytest.approx(values[1], rel=1e-4)


def test_paper_running_sigma_follows_its_momentum_is_kept_in_the_state_and_frozen_in_eval():
    student, teacher = features()
    akd = AKDLoss(base="mse", num_avatars=2, drop_rate=0.2, uncertainty="paper", sigma_momentum=0.25,
                  channels=CHANNELS, num_levels=LEVELS)
    batches = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        fresh = AKDLoss(base="mse", num_avatars=2, drop_rate=0.2, uncertainty="paper")
        fresh([s * (1 + seed) for s in student], [t * (1 + seed) for t in teacher])
        batches.append(fresh.sigma2_0.clone())
        torch.manual_seed(seed)
        akd([s * (1 + seed) for s in student], [t * (1 + seed) for t in teacher])
    assert torch.allclose(akd.sigma2_0, 0.75 * batches[0] + 0.25 * batches[1], rtol=1e-5)
    state = akd.state_dict()
    assert {"sigma2_0", "sigma2_1", "sigma_steps_0", "sigma_steps_1"} <= set(state) and int(state["sigma_steps_0"]) == 2
    restored = AKDLoss(base="mse", num_avatars=2, drop_rate=0.2, uncertainty="paper", sigma_momentum=0.25,
                       channels=CHANNELS, num_levels=LEVELS)
    restored.load_state_dict(state)
    assert torch.equal(restored.sigma2_1, akd.sigma2_1)
    restored.eval()
    restored(student, teacher)
    assert torch.equal(restored.sigma2_1, akd.sigma2_1) and int(restored.sigma_steps_1) == 2


def test_paper_factor_draws_the_same_avatars_as_without_it():
    """sigma's pass rewinds the generator: the loss sees the Avatars a run without the factor would."""
    student, teacher = features()
    torch.manual_seed(4)
    AKDLoss(base="mse", num_avatars=3, uncertainty="paper")(student, teacher)
    after_paper = torch.rand(3)
    torch.manual_seed(4)
    AKDLoss(base="mse", num_avatars=3, uncertainty="none")(student, teacher)
    assert torch.equal(after_paper, torch.rand(3))


def _independent_weights(teacher, avatars):
    """The variance factor, computed the long way: per image, per Avatar, with Python loops."""
    n = teacher.shape[0]
    weights = torch.zeros(len(avatars), n, dtype=torch.float64)
    for k, avatar in enumerate(avatars):
        for i in range(n):
            t, a = teacher[i].double().flatten(1), avatar[i].double().flatten(1)
            shift = (a.mean(1) - t.mean(1)) / (t.std(1, unbiased=False) + 1e-6)
            weights[k, i] = 1.0 / (((shift - shift.mean()) ** 2).mean() + 1e-12)
    return weights / weights.sum(dim=0, keepdim=True)


@pytest.mark.parametrize("base", ["cwd", "mse", "pkd"])
@pytest.mark.parametrize("num_avatars", [1, 2, 5])
def test_fused_equals_an_independent_per_avatar_loop(base, num_avatars):
    student, teacher = features()
    akd = AKDLoss(base=base, num_avatars=num_avatars, drop_rate=0.3, uncertainty="none", weighting="inverse_variance")
    torch.manual_seed(11)
    fused = akd(student, teacher)
    torch.manual_seed(11)
    naive = torch.zeros((), dtype=torch.float64)
    plain = BASE_LOSSES[base]()
    for s, t in zip(student, teacher):
        avatars = [make_avatar(t, "dropout", 0.3) for _ in range(num_avatars)]
        gamma = _independent_weights(t, avatars)
        for k, a in enumerate(avatars):
            for i in range(t.shape[0]):
                # PKD normalises over the batch: take per-image terms of the whole-batch loss
                per_image = plain.per_image(plain.prepare_student(s), a)
                naive = naive + gamma[k, i] * per_image[i].double()
    assert fused.item() == pytest.approx(naive.item(), rel=1e-5)


@pytest.mark.parametrize("base", sorted(BASE_LOSSES))
@pytest.mark.parametrize("uncertainty", ["paper", "release", "none"])
@pytest.mark.parametrize("weighting", ["mean", "inverse_variance"])
@pytest.mark.parametrize("perturbation", ["dropout", "channel", "noise"])
def test_fused_equals_naive_for_every_mode(base, uncertainty, weighting, perturbation):
    student, teacher = features()
    values, grads = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        akd = AKDLoss(base=base, num_avatars=4, drop_rate=0.2, uncertainty=uncertainty, weighting=weighting,
                      perturbation=perturbation, fused=fused, **base_kwargs(base))
        torch.manual_seed(1)
        loss = akd(student, teacher, **context(base))
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, student))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    for g_fused, g_naive in zip(*grads):
        assert torch.allclose(g_fused, g_naive, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("weighting", ["mean", "inverse_variance"])
def test_one_avatar_without_a_factor_is_the_base_loss_on_that_avatar(weighting):
    student, teacher = features()
    torch.manual_seed(4)
    got = AKDLoss(base="cwd", num_avatars=1, drop_rate=0.4, uncertainty="none", weighting=weighting)(student, teacher)
    torch.manual_seed(4)
    expected = sum(CWDLoss()(s, make_avatar(t, "dropout", 0.4)) for s, t in zip(student, teacher))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_uncertainty_favours_the_avatar_closer_to_the_teacher():
    teacher = torch.randn(2, 16, 8, 8)
    torch.manual_seed(0)
    mild, strong = make_avatar(teacher, "channel", 0.05), make_avatar(teacher, "channel", 0.5)
    u_mild, u_strong = avatar_uncertainty(teacher, mild), avatar_uncertainty(teacher, strong)
    assert torch.all(u_strong > u_mild)
    gamma = _independent_weights(teacher, [mild, strong])
    assert torch.all(gamma[0] > gamma[1])
    assert torch.allclose(gamma.sum(0), torch.ones(2, dtype=torch.float64))


# --- gradients, determinism, cost ---------------------------------------------------------------

@pytest.mark.parametrize("base", sorted(BASE_LOSSES))
@pytest.mark.parametrize("uncertainty", ["paper", "release", "none"])
def test_gradient_reaches_the_student_and_never_the_teacher(base, uncertainty):
    student, teacher = features()
    teacher = [t.clone().requires_grad_(True) for t in teacher]
    loss = AKDLoss(base=base, num_avatars=2, uncertainty=uncertainty, **base_kwargs(base))(student, teacher,
                                                                                           **context(base))
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


@pytest.mark.parametrize("perturbation", ["dropout", "channel", "noise"])
def test_avatars_are_reproducible_under_a_seed_and_fresh_each_call(perturbation):
    teacher = torch.randn(2, 4, 5, 5)
    torch.manual_seed(7)
    first, second = make_avatar(teacher, perturbation, 0.3), make_avatar(teacher, perturbation, 0.3)
    torch.manual_seed(7)
    again = make_avatar(teacher, perturbation, 0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_avatars_are_unbiased():
    teacher = torch.randn(1, 8, 64, 64)
    torch.manual_seed(0)
    for perturbation in ("dropout", "channel", "noise"):
        mean = torch.stack([make_avatar(teacher, perturbation, 0.3) for _ in range(400)]).mean(0)
        assert (mean - teacher).abs().mean() < 0.1 * teacher.abs().mean()


@pytest.mark.parametrize("base", sorted(BASE_LOSSES))
@pytest.mark.parametrize("fused", [True, False])
def test_half_precision_features_give_the_float32_loss(base, fused):
    """Mixed precision: float16 features (as under AMP), with weights far beyond float16's range."""
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, CHANNELS, 90, 80, generator=g) for _ in range(LEVELS)]
    teacher = [torch.randn(2, CHANNELS, 90, 80, generator=g) * 3 for _ in range(LEVELS)]
    values = []
    for dtype in (torch.float16, torch.float32):
        torch.manual_seed(0)
        akd = AKDLoss(base=base, num_avatars=3, fused=fused, **base_kwargs(base))
        torch.manual_seed(1)
        cast = [[x.to(dtype) for x in feats] for feats in (student, teacher)]
        ctx = context(base)
        if ctx:
            ctx["img_shape"] = (720, 640)
        values.append(akd(*cast, **ctx).item())
    assert math.isfinite(values[0]) and values[0] == pytest.approx(values[1], rel=2e-2)


ON_CUDA_TOO = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", ON_CUDA_TOO)
@pytest.mark.parametrize("base", sorted(BASE_LOSSES))
def test_the_loss_under_float16_autocast_is_the_float32_loss(base, device):
    """As under --amp, where the loss runs inside autocast: einsum, bmm and @ then run in float16
    whatever their inputs, and sums over a feature map overflow (MSE, PKD, MGD and MasKD gave NaN or
    0 on an H200). CPU autocast in float16 does the same, so this holds without a GPU too."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 32, 64, 80, generator=g) * 3, torch.randn(2, 32, 32, 40, generator=g) * 3]
    teacher = [(torch.randn(x.shape, generator=g) * 3).to(device) for x in inputs]
    inputs = [x.to(device) for x in inputs]
    stem = torch.nn.Conv2d(32, 32, 3, padding=1).to(device)
    torch.manual_seed(0)
    akd = AKDLoss(base=base, num_avatars=3, **({"channels": 32, "num_levels": 2} if BASE_LOSSES[base].needs_channels else {}))
    akd.to(device)
    ctx = {"gt_bboxes": [torch.tensor([[4.0, 4.0, 40.0, 30.0]], device=device),
                         torch.tensor([[10.0, 20.0, 70.0, 60.0]], device=device)],
           "img_shape": (64, 80)} if base == "fgd" else {}
    values = []
    for amp in (False, True):
        stem.zero_grad()
        torch.manual_seed(1)
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            student = [stem(x) for x in inputs]
            assert student[0].dtype == (torch.float16 if amp else torch.float32)
            loss = akd(student, [t.half() if amp else t for t in teacher], **ctx)
        assert loss.dtype == torch.float32
        loss.backward()
        assert torch.isfinite(stem.weight.grad).all() and stem.weight.grad.abs().sum() > 0
        values.append(loss.item())
    # On CUDA the Avatars' dropout masks depend on the dtype they are drawn in; on the CPU they do not.
    assert math.isfinite(values[1]) and values[1] == pytest.approx(values[0], rel=1e-2 if device == "cpu" else 3e-2)


def test_loss_is_deterministic_under_a_seed():
    student, teacher = features()
    values = []
    for _ in range(2):
        torch.manual_seed(3)
        values.append(AKDLoss(base="mgd", num_avatars=3, channels=CHANNELS, num_levels=LEVELS)(student, teacher))
    assert torch.equal(values[0], values[1])


def _saved_bytes(fn):
    """Bytes autograd keeps for backward while fn runs: what training memory grows with."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


@pytest.mark.parametrize("base", ["cwd", "mse", "pkd", "mgd", "maskd"])
@pytest.mark.parametrize("uncertainty", ["paper", "release", "none"])
def test_fused_memory_does_not_grow_with_avatars(base, uncertainty):
    student, teacher = features()
    kwargs = dict(base_kwargs(base), uncertainty=uncertainty)
    cost = {k: _saved_bytes(lambda: AKDLoss(base=base, num_avatars=k, **kwargs)(student, teacher))
            for k in (1, 2, 8)}
    assert cost[8] == cost[2]
    looped = _saved_bytes(lambda: AKDLoss(base=base, num_avatars=8, fused=False, **kwargs)(student, teacher))
    assert looped > cost[2]
    # one Avatar is the base loss on it, whose memory is at most the fused form's
    assert cost[1] <= cost[2]
    if uncertainty == "none":  # and without a factor, exactly the plain loss's
        assert cost[1] == _saved_bytes(lambda: AKDLoss(base=base, num_avatars=0, **kwargs)(student, teacher))


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"drop_rate": 1.0}, "drop_rate"), ({"drop_rate": -0.1}, "drop_rate"),
    ({"num_avatars": -1}, "num_avatars"), ({"num_avatars": 1.5}, "num_avatars"),
    ({"uncertainty": "entropy"}, "uncertainty"), ({"perturbation": "blur"}, "perturbation"),
    ({"base": "kd"}, "base loss"), ({"base": "cwd", "temperature": 2}, "accepted options: tau"),
    ({"base": "mgd"}, "channels"),
])
def test_bad_options_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AKDLoss(**kwargs)


def test_mismatched_level_counts_and_shapes_name_the_level():
    student, teacher = features()
    with pytest.raises(ValueError, match="2 student level.*1 teacher level"):
        AKDLoss()(student, teacher[:1])
    with pytest.raises(ValueError, match=r"level 1: student shape \(2, 8, 6, 5\) and teacher shape \(2, 8, 6, 4\)"):
        AKDLoss()(student, [teacher[0], teacher[1][..., :4]])
    with pytest.raises(ValueError, match="built for 2 level"):
        AKDLoss(base="mgd", channels=CHANNELS, num_levels=2)(student[:1], teacher[:1])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("role, level, where", [("teacher", 1, (0, 0, 0, 0)), ("student", 0, (1, 7, 11, 9)),
                                                ("teacher", 0, (1, 3, 5, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_features_name_the_level_and_role(value, role, level, where, dtype):
    student, teacher = features()
    student, teacher = [s.detach().to(dtype) for s in student], [t.to(dtype) for t in teacher]
    chosen = student if role == "student" else teacher
    chosen[level][where] = value
    shape = re.escape(str(tuple(chosen[level].shape)))
    with pytest.raises(ValueError, match=rf"level {level}: {role} feature of shape {shape} holds non-finite"):
        AKDLoss(base="mse")(student, teacher)


@pytest.mark.parametrize("dtype, peak", [(torch.float32, 3.0e38), (torch.float16, 65504.0)])
def test_the_largest_finite_features_are_finite(dtype, peak):
    """The check takes each map's minimum and maximum: finite however large, if every element is."""
    student, teacher = features(requires_grad=False)
    student, teacher = [s.to(dtype) for s in student], [t.to(dtype) for t in teacher]
    teacher[0][0, 0, 0, 0], student[1][1, 2, 3, 4] = peak, -peak
    assert bool(_all_finite(student + teacher))
    assert len(AKDLoss(base="mse", num_avatars=0).per_level(student, teacher)) == LEVELS  # and no error
    student[1][1, 2, 3, 1] = float("inf")
    assert not bool(_all_finite(student + teacher))


class _DeviceReads(TorchFunctionMode):
    """Records every torch call, and which of them read a tensor's value into Python: on a GPU each
    such read waits for all queued work."""

    READS = {"__bool__", "item", "__int__", "__float__", "__index__", "tolist"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    @property
    def reads(self):
        return [name for name in self.calls if name in self.READS]


@pytest.mark.parametrize("base,uncertainty,avatars,kernel", [
    (base, uncertainty, avatars, "loop") for base in BASE_LOSSES if base != "fgd"
    for uncertainty in ("paper", "release") for avatars in (1, 3)] + [
    ("cwd", "paper", 3, "fused"), ("maskd", "release", 2, "fused"), ("mse", "paper", 1, "fused"),
    ("cwd", "none", 0, "loop")])
def test_a_call_reads_from_the_device_once_after_all_its_work(base, uncertainty, avatars, kernel):
    """On a GPU the host then queues the whole loss while the forward passes before it still run.
    (FGD reads its boxes: it is not here.)"""
    student, teacher = features()
    options = dict(student_masks_after=1) if base == "maskd" else {}
    akd = AKDLoss(base=base, num_avatars=avatars, drop_rate=0.2, uncertainty=uncertainty, avatar_kernel=kernel,
                  **base_kwargs(base), **options)
    akd(student, teacher)  # MasKD reads its warm-up count once, after it is made or loaded
    with _DeviceReads() as mode:
        losses = akd.per_level(student, teacher)
    assert len(losses) == LEVELS
    assert mode.reads == ["__bool__"] and mode.calls[-1] == "__bool__", mode.reads


@pytest.mark.parametrize("kernel", ["loop", "fused"])
def test_a_non_finite_call_raises_and_leaves_the_running_sigma_as_it_was(kernel):
    student, teacher = features()
    akd = AKDLoss(base="cwd", num_avatars=2, drop_rate=0.2, uncertainty="paper", avatar_kernel=kernel)
    akd(student, teacher)
    before = {name: value.clone() for name, value in akd.state_dict().items()}
    teacher[1] = teacher[1].clone()
    teacher[1][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"level 1: teacher feature .* holds non-finite"):
        akd(student, teacher)
    assert all(torch.equal(before[name], value) for name, value in akd.state_dict().items())


@pytest.mark.parametrize("base", ["cwd", "mgd"])
def test_the_paper_sigma_comes_from_the_very_avatars_the_loss_sees(base, monkeypatch):
    """torch's generator: the sigma's draws are replayed for the loss, and MGD's student masks (drawn
    between them) take other random numbers, so they shift no Avatar."""
    import akd_cli.core.akd as akd_module

    drawn = []

    def recorded(*args, **kwargs):
        drawn.append(make_avatar(*args, **kwargs).clone())
        return drawn[-1]

    monkeypatch.setattr(akd_module, "make_avatar", recorded)
    student, teacher = features()
    k = 2
    akd = AKDLoss(base=base, num_avatars=k, drop_rate=0.3, uncertainty="paper", **base_kwargs(base))
    torch.manual_seed(0)
    akd(student, teacher)
    assert len(drawn) == 2 * k * LEVELS
    for for_sigma, for_loss in zip(drawn[:k * LEVELS], drawn[k * LEVELS:]):
        assert torch.equal(for_sigma, for_loss)
    for level, t in enumerate(teacher):
        avatars = drawn[level * k:(level + 1) * k]
        expected = sum((a - t).pow(2).sum(dim=(0, 2, 3)) for a in avatars) / (k * t[:, 0].numel())
        assert torch.allclose(getattr(akd, f"sigma2_{level}"), expected, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["loop", "fused"])
def test_ranks_take_the_paper_sigma_together_in_one_all_reduce(kernel):
    """Two gloo ranks with different batch and map sizes: sigma^2 is the pooled one (sums and sample
    counts of both ranks); one all-reduce per call for all levels; a NaN on rank 1 makes rank 1
    raise and leaves both ranks' running sigma as it was."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import sigma_worker  # tests/ is on sys.path, as for test_cuda's imports of test_fused

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    workers = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "sigma_worker.py"), str(rank), port, kernel],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    sums, counts = [0.0, 0.0], [0, 0]
    for rank in (0, 1):  # each rank alone: its sigma^2 is its own sum over its own count
        alone = sigma_worker.loss(kernel)
        student, teacher = sigma_worker.features(rank)
        torch.manual_seed(rank)
        alone(student, teacher)
        for level, t in enumerate(teacher):
            count = 2 * t[:, 0].numel()
            sums[level] = sums[level] + getattr(alone, f"sigma2_{level}") * count
            counts[level] += count
    for result in results:
        assert result["all_reduces"] == [2 * 8 + 2 + 1]  # both levels' sums, their counts, the flag
        for level in (0, 1):
            assert torch.allclose(torch.tensor(result["sigma2"][level]), sums[level] / counts[level], rtol=1e-5)
        assert result["state_kept"]
    assert results[0]["raised"] is None
    assert re.match(r"level 0: teacher feature .* holds non-finite", results[1]["raised"])


def test_the_readme_library_example_runs_as_written():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```python\nimport torch\nfrom akd_cli import AKDLoss")
    block = readme[start + len("```python\n"):readme.index("```", start + 10)]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and all(s.grad is not None for s in namespace["student_feats"])

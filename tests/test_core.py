"""The pure-torch AKD core: values, equivalences, gradients, determinism, cost and bad input."""
import math

import pytest
import torch

from akd_cli import AKDLoss
from akd_cli.core import BASE_LOSSES, make_avatar
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
@pytest.mark.parametrize("uncertainty", ["variance", "none"])
@pytest.mark.parametrize("num_avatars", [1, 3, 8])
def test_drop_rate_zero_equals_the_base_loss(base, uncertainty, num_avatars):
    student, teacher = features()
    torch.manual_seed(0)
    akd = AKDLoss(base=base, num_avatars=num_avatars, drop_rate=0.0, uncertainty=uncertainty, **base_kwargs(base))
    plain = AKDLoss(base=base, num_avatars=0, **base_kwargs(base))
    plain.load_state_dict(akd.state_dict())
    torch.manual_seed(1)
    got = akd(student, teacher, **context(base))
    torch.manual_seed(1)
    assert torch.allclose(got, plain(student, teacher, **context(base)), rtol=1e-5, atol=1e-7)


def test_bn_mode_at_drop_rate_zero_is_the_base_loss_on_standardised_features():
    student, teacher = features()
    got = AKDLoss(base="cwd", num_avatars=2, drop_rate=0.0, uncertainty="bn")(student, teacher)
    expected = sum(CWDLoss()(standardise(s), standardise(t)) for s, t in zip(student, teacher))
    assert torch.allclose(got, expected, rtol=1e-5)


def test_bn_mode_statistics_are_not_mixed_and_fit_any_channel_count():
    student = [torch.randn(2, 256, 8, 8) * 5 + 3, torch.randn(2, 64, 4, 4)]
    teacher = [torch.randn(2, 256, 8, 8), torch.randn(2, 64, 4, 4) * 0.1]
    loss = AKDLoss(base="mse", num_avatars=1, drop_rate=0.0, uncertainty="bn", loss_weight=1.0)
    got = loss(student, teacher)
    # standardised independently, then compared: the student's scale and shift do not leak
    expected = sum(MSELoss()(standardise(s), standardise(t)) for s, t in zip(student, teacher))
    assert torch.allclose(got, expected, rtol=1e-5)


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
    akd = AKDLoss(base=base, num_avatars=num_avatars, drop_rate=0.3, uncertainty="variance")
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
@pytest.mark.parametrize("uncertainty", ["variance", "bn", "none"])
@pytest.mark.parametrize("perturbation", ["dropout", "channel", "noise"])
def test_fused_equals_naive_for_every_mode(base, uncertainty, perturbation):
    student, teacher = features()
    values, grads = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        akd = AKDLoss(base=base, num_avatars=4, drop_rate=0.2, uncertainty=uncertainty,
                      perturbation=perturbation, fused=fused, **base_kwargs(base))
        torch.manual_seed(1)
        loss = akd(student, teacher, **context(base))
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss, student))
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    for g_fused, g_naive in zip(*grads):
        assert torch.allclose(g_fused, g_naive, rtol=1e-4, atol=1e-7)


def test_one_avatar_variance_is_the_base_loss_on_that_avatar():
    student, teacher = features()
    torch.manual_seed(4)
    got = AKDLoss(base="cwd", num_avatars=1, drop_rate=0.4)(student, teacher)
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
def test_gradient_reaches_the_student_and_never_the_teacher(base):
    student, teacher = features()
    teacher = [t.clone().requires_grad_(True) for t in teacher]
    loss = AKDLoss(base=base, num_avatars=2, **base_kwargs(base))(student, teacher, **context(base))
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
def test_fused_memory_does_not_grow_with_avatars(base):
    student, teacher = features()
    kwargs = base_kwargs(base)
    cost = {k: _saved_bytes(lambda: AKDLoss(base=base, num_avatars=k, **kwargs)(student, teacher))
            for k in (1, 2, 8)}
    assert cost[8] == cost[2]
    looped = _saved_bytes(lambda: AKDLoss(base=base, num_avatars=8, fused=False, **kwargs)(student, teacher))
    assert looped > cost[2]
    # one Avatar is the base loss on it, whose memory is at most the fused form's
    assert cost[1] <= cost[2] and cost[1] == _saved_bytes(lambda: AKDLoss(base=base, num_avatars=0, **kwargs)(student, teacher))


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


def test_non_finite_features_name_the_level_and_role():
    student, teacher = features()
    teacher[1] = teacher[1].clone()
    teacher[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"level 1: teacher feature of shape \(2, 8, 6, 5\) holds non-finite"):
        AKDLoss()(student, teacher)


def test_the_readme_library_example_runs_as_written():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("```python\nimport torch\nfrom akd_cli import AKDLoss")
    block = readme[start + len("```python\n"):readme.index("```", start + 10)]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and all(s.grad is not None for s in namespace["student_feats"])

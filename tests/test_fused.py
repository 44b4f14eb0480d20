"""The fused Avatar passes (akd_cli/core/fused.py) against the loop they replace.

The loop with the counter-based generator (avatar_rng="counter") draws the very Avatars the fused
passes draw, so the two must agree to float32 rounding: values, gradients and the running sigma,
over several steps, for every fusable base loss, factor and weighting. The compiled passes run
here through inductor's C++ backend (on a GPU the same graphs become Triton kernels; test_cuda.py
checks them there, and test_triton_interpret.py reruns the compiled cases here as Triton kernels in
Triton's interpreter). Pure torch: no mmcv needed.
"""
import itertools
import math
import os
import re

import pytest
import torch

from akd_cli import AKDLoss
from akd_cli.core import counter_rng, fused
from akd_cli.core.avatars import make_avatar
from akd_cli.core.losses import BASE_LOSSES
from akd_cli.core.tokens import ReceptiveTokens

SHAPES = [(2, 16, 12, 10), (2, 16, 6, 5)]
RTOL = 1e-5


def _options(base, shapes):
    options = dict(channels=shapes[0][1], num_levels=len(shapes)) if base in ("mgd", "maskd") else {}
    if base == "maskd":
        options["student_masks_after"] = 1  # the second step on uses the student's masks too
    return options


def _steps(kernel, base, uncertainty, weighting, avatars, steps=3, dtype=torch.float32, drop_rate=0.3,
           shapes=SHAPES, device="cpu"):
    """Loss values, student gradients and running sigma of a few training steps (test_cuda.py's
    twin runs it on the GPU)."""
    torch.manual_seed(0)
    loss_fn = AKDLoss(base=base, num_avatars=avatars, drop_rate=drop_rate, uncertainty=uncertainty, weighting=weighting,
                      avatar_kernel=kernel, avatar_rng="counter", **_options(base, shapes)).to(device)
    generator = torch.Generator().manual_seed(1)
    students = [torch.randn(s, generator=generator).to(device, dtype).requires_grad_() for s in shapes]
    teachers = [(torch.randn(s, generator=generator) + 0.5).to(device, dtype) for s in shapes]
    values, grads = [], []
    for step in range(steps):
        torch.manual_seed(10 + step)
        loss = loss_fn(students, teachers)
        loss.backward()
        values.append(loss.item())
        grads.append([s.grad.clone() for s in students])
        for s in students:
            s.grad = None
    sigma = [loss_fn.running_sigma(i) for i in range(len(shapes))]
    return values, grads, sigma


def _relative(a, b):
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)


def _assert_same(reference, other, rtol=RTOL):
    (v1, g1, s1), (v2, g2, s2) = reference, other
    for a, b in zip(v1, v2):
        assert math.isfinite(b) and abs(a - b) <= rtol * abs(a), (v1, v2)
    for step1, step2 in zip(g1, g2):
        for a, b in zip(step1, step2):
            assert _relative(a, b) <= rtol
    for a, b in zip(s1, s2):
        assert (a is None) == (b is None)
        if a is not None:
            assert _relative(a, b) <= rtol


# ---------------------------------------------------------------------------------- generator
def test_counter_masks_keep_the_rate_and_are_independent_across_avatars_and_positions():
    seed, p, n = torch.tensor(12345), 0.1, 200_000
    keep = counter_rng.keep_mask((n,), counter_rng.avatar_keys(seed, torch.arange(4)), counter_rng.Drop.of(p)).double()
    bound = 5 * math.sqrt(p * (1 - p) / n)                    # 5 standard errors
    for k in range(4):
        assert abs(keep[k].mean().item() - (1 - p)) < bound
    for a, b in itertools.combinations(range(4), 2):          # two Avatars, same positions
        assert abs((keep[a] * keep[b]).mean().item() - (1 - p) ** 2) < bound
    assert abs((keep[0, 1:] * keep[0, :-1]).mean().item() - (1 - p) ** 2) < bound   # neighbours
    assert abs((keep[0, 16:] * keep[0, :-16]).mean().item() - (1 - p) ** 2) < bound


def test_counter_masks_are_a_function_of_seed_avatar_and_position():
    teacher = torch.randn(2, 8, 9, 7)
    seed = counter_rng.draw_seed(teacher.device)
    first, again = make_avatar(teacher, seed=seed, index=3), make_avatar(teacher, seed=seed, index=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, make_avatar(teacher, seed=seed, index=2))
    assert not torch.equal(first, make_avatar(teacher, seed=seed + 1, index=3))
    everything = fused.raw_avatars(teacher, counter_rng.avatar_keys(seed, fused.avatar_indices(5, seed.device)),
                                    counter_rng.Drop.of(0.1))
    assert torch.equal(everything[3], first), "the fused passes and the loop draw the same Avatar"
    kept = first != 0
    assert torch.allclose(first[kept], teacher[kept] / 0.9)


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 64, 40, 33), (1_000_003,)])
def test_the_gpus_wrapping_int32_hash_gives_the_cpus_int64_bits(shape):
    """CUDA hashes in wrapping int32 (counter_rng.hash_bits), the CPU in int64: one mask either way.
    Checked here in eager int32 on the CPU; test_cuda.py checks the GPU's eager and Triton code."""
    assert counter_rng.hash_bits(torch.device("cuda")) == 32 and counter_rng.hash_bits(torch.device("cpu")) == 64
    g = torch.Generator().manual_seed(len(shape))
    for seed in torch.randint(counter_rng.SEED_HIGH, (3,), generator=g).tolist() + [0, counter_rng.SEED_HIGH - 1]:
        keys = counter_rng.avatar_keys(torch.tensor(seed), torch.arange(5))
        for drop in map(counter_rng.Drop.of, (0.1, 0.5, 0.9)):
            wide = counter_rng.keep_mask(shape, keys, drop, bits=64)
            assert torch.equal(counter_rng.keep_mask(shape, keys, drop, bits=32), wide)
    x = torch.randint(0, 2 ** 32, (100_000,), generator=g, dtype=torch.int64)
    as_int32 = counter_rng.mix32_wrapping(x.to(torch.int32)).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(as_int32, counter_rng.mix32(x))


def test_seeds_come_from_torchs_generator():
    torch.manual_seed(3)
    a = counter_rng.draw_seed(torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(a, counter_rng.draw_seed(torch.device("cpu")))


# ------------------------------------------------------------------------------ fused = loop
CASES = list(itertools.product(fused.FUSED_BASES, ("paper", "release", "none"), ("mean", "inverse_variance"), (2, 3)))
# one Avatar through the passes too (a K of one: its weight 1, MSE's spread 0)
CASES += [("cwd", "paper", "mean", 1), ("maskd", "paper", "inverse_variance", 1), ("mse", "release", "mean", 1),
          ("maskd", "release", "mean", 1)]


@pytest.mark.parametrize("base,uncertainty,weighting,avatars", CASES)
def test_fused_passes_equal_the_loop(base, uncertainty, weighting, avatars):
    _assert_same(_steps("loop", base, uncertainty, weighting, avatars),
                 _steps("fused", base, uncertainty, weighting, avatars))


COMPILED_CASES = [("cwd", "paper", "mean", 8), ("cwd", "none", "mean", 1), ("maskd", "paper", "mean", 1),
                  ("mse", "release", "mean", 1),
                  ("mse", "release", "inverse_variance", 3),
                  ("maskd", "release", "mean", 2), ("pkd", "paper", "mean", 2), ("mgd", "release", "mean", 2)]


@pytest.mark.parametrize("base,uncertainty,weighting,avatars", COMPILED_CASES)
def test_compiled_passes_equal_the_loop(base, uncertainty, weighting, avatars):
    _assert_same(_steps("loop", base, uncertainty, weighting, avatars),
                 _steps("compiled", base, uncertainty, weighting, avatars))


@pytest.mark.parametrize("kernel,base,uncertainty,weighting,avatars",
                         [("fused", "maskd", "release", "inverse_variance", 3), ("fused", "cwd", "paper", "mean", 2),
                          ("compiled", "mse", "release", "inverse_variance", 3), ("compiled", "cwd", "paper", "mean", 2),
                          ("compiled", "maskd", "release", "mean", 2)])
def test_both_layouts_of_the_avatars_equal_the_loop(monkeypatch, kernel, base, uncertainty, weighting, avatars):
    """Both layouts (fused.LAYOUT forces one for every pass) compute the loop's values: "unrolled",
    K expressions over one hash, and "stacked", one K-fold expression. The passes take the layout as
    an argument, on which dynamo specialises: a process that changes it compiles again rather than
    reusing a graph."""
    loop = _steps("loop", base, uncertainty, weighting, avatars)
    for layout in ("unrolled", "stacked"):
        monkeypatch.setattr(fused, "LAYOUT", layout)
        _assert_same(loop, _steps(kernel, base, uncertainty, weighting, avatars))


@pytest.mark.parametrize("base,uncertainty", [("cwd", "release"), ("mse", "release"), ("pkd", "paper"),
                                              ("maskd", "release")])
def test_each_base_loss_takes_its_own_layout_in_every_pass(monkeypatch, base, uncertainty):
    """Every pass of a base loss, its statistics too, holds the Avatars in the layout measured faster
    for it (fused.PASS_LAYOUTS), unless fused.LAYOUT forces one. MasKD's edge rows (two rows of each
    map, for its token weights) are stacked whatever the layout."""
    assert set(fused.PASS_LAYOUTS) == {BASE_LOSSES[name].teacher_pass for name in fused.FUSED_BASES}
    seen = []
    groups = fused.avatar_groups
    monkeypatch.setattr(fused, "avatar_groups", lambda *args: seen.append(args[-1]) or groups(*args))
    edges = {"stacked"} if base == "maskd" else set()
    _steps("fused", base, uncertainty, "mean", 2, steps=1)
    assert seen and set(seen) == {fused.PASS_LAYOUTS[BASE_LOSSES[base].teacher_pass]} | edges
    for layout in fused.LAYOUTS:
        monkeypatch.setattr(fused, "LAYOUT", layout)
        seen.clear()
        _steps("fused", base, uncertainty, "mean", 2, steps=1)
        assert seen and set(seen) == {layout} | edges


def test_one_seed_draw_and_few_calls_serve_all_levels(monkeypatch):
    """Per call, not per level: the passes' host work is what a GPU step waits on (bench/RESULTS.md).
    Two Avatars or more: one keys call; then each level's whole teacher side and its student side in
    one call for the first level and one for the others; the paper's factor adds one statistics call.
    The student is prepared under its factor in those calls where the base loss's preparation is
    pure (CWD, PKD, MSE), outside where it draws random numbers (MGD). One Avatar takes the same calls."""
    import collections

    import akd_cli.core.akd as akd_module

    calls = collections.Counter()

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    for name, function in list(fused.FUNCTIONS.items()):
        monkeypatch.setitem(fused.FUNCTIONS, name, counted(name, function))
    monkeypatch.setattr(akd_module, "draw_seed", counted("seed", counter_rng.draw_seed))
    monkeypatch.setattr(fused, "student_under_factor", counted("student in the passes", fused.student_under_factor))
    monkeypatch.setattr(akd_module, "student_under_factor", counted("student outside", akd_module.student_under_factor))
    shapes = SHAPES + [(2, 16, 3, 3)]
    students, teachers = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
    AKDLoss(base="cwd", num_avatars=3, uncertainty="paper", avatar_kernel="fused")(students, teachers)
    # the groups: the first level alone, the others together (AKDLoss._fused_losses says why)
    assert calls == {"seed": 1, "keys": 1, "statistics_levels": 1, "statistics": 3, "cwd_group": 2, "terms": 3,
                     "cwd": 3, "student in the passes": 3}
    calls.clear()
    AKDLoss(base="pkd", num_avatars=3, uncertainty="release", weighting="inverse_variance",
            avatar_kernel="fused")(students, teachers)
    assert calls == {"seed": 1, "keys": 1, "mse_group": 2, "terms": 3, "mse": 3, "student in the passes": 3}
    calls.clear()
    AKDLoss(base="mgd", num_avatars=3, uncertainty="release", channels=16, num_levels=len(shapes),
            avatar_kernel="fused")(students, teachers)
    assert calls == {"seed": 1, "keys": 1, "mse_group": 2, "terms": 3, "mse": 3, "student outside": 3}
    calls.clear()
    AKDLoss(base="mse", num_avatars=1, uncertainty="paper", avatar_kernel="fused")(students, teachers)
    assert calls == {"seed": 1, "keys": 1, "statistics_levels": 1, "statistics": 3, "mse_group": 2, "terms": 3,
                     "mse": 3, "student in the passes": 3}


@pytest.mark.parametrize("avatars", [1, 3])
def test_compiled_passes_draw_at_each_calls_own_drop_rate(avatars):
    """One process, three drop rates: the compiled passes (one Avatar's kernel, or the statistics and
    terms passes) must draw each rate's Avatars. The keep threshold, once computed inside them from
    the float rate, made dynamo specialise on the rate, and inductor's FX graph cache then gave the
    recompilation for the second rate the first one's code: the loss went on at 0.3 (counter_rng.Drop)."""
    for p in (0.3, 0.1, 0.5):
        _assert_same(_steps("loop", "mse", "paper", "mean", avatars, steps=1, drop_rate=p),
                     _steps("compiled", "mse", "paper", "mean", avatars, steps=1, drop_rate=p))


@pytest.mark.parametrize("base,uncertainty", [("cwd", "paper"), ("maskd", "release")])
def test_compiled_passes_compile_once_for_changing_batch_shapes(base, uncertainty):
    """A detector's padded batch shape changes from batch to batch, and with it which sizes happen to
    coincide: a level's height, then a level's width, equals the channel count (16), then no sizes
    coincide, then a level's height equals another's width. One graph per pass must serve every
    shape: with duck sizing (torch's default) each new pattern of equal sizes was a recompilation.
    Three levels, a count no other test compiles, so that no graph compiled before serves these
    shapes. The maps keep their size classes: inductor's C++ code guards on a reduction's size
    passing 4096 (level 0's images x positions above, level 1's below), a bounded choice of kernel,
    not one per shape. MasKD too: its graphs hold a convolution (the token head), which lays tensors
    out channels-last, and a backward once checked a saved view of one against the first shape's
    strides."""
    from torch._dynamo.utils import counters

    loss_fn = AKDLoss(base=base, num_avatars=3, uncertainty=uncertainty, avatar_kernel="compiled",
                      **_options(base, [(2, 16)] * 3))

    def step(h, w):
        students = [torch.randn(2, 16, h >> i, w >> i, requires_grad=True) for i in range(3)]
        loss_fn(students, [torch.randn(2, 16, h >> i, w >> i) for i in range(3)]).backward()

    for _ in range(2):  # compiles: level 2 is 16 x 24 (MasKD's second call on takes the student's masks too)
        step(64, 96)
    graphs = counters["stats"]["unique_graphs"]
    for h, w in [(96, 64), (80, 96), (48, 96)]:
        step(h, w)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_passes_are_reproducible_under_a_seed():
    assert _steps("compiled", "cwd", "paper", "mean", 4)[0] == _steps("compiled", "cwd", "paper", "mean", 4)[0]


def test_float16_features_agree_to_float16_precision_and_sums_do_not_overflow():
    # float16 features: the loop draws each Avatar in float16, the passes in float32; both sum in float32
    for base in ("cwd", "mse", "maskd"):
        loop = _steps("loop", base, "paper", "mean", 4, steps=2, dtype=torch.float16)
        _assert_same(loop, _steps("fused", base, "paper", "mean", 4, steps=2, dtype=torch.float16), rtol=1e-2)
    # |a|^2 summed over a level exceeds float16's 65504: the constant stays finite
    loss_fn = AKDLoss(base="mse", num_avatars=4, avatar_kernel="fused", uncertainty="none")
    teacher = torch.full((2, 16, 32, 32), 20.0, dtype=torch.float16)
    student = torch.zeros_like(teacher, requires_grad=True)
    assert math.isfinite(loss_fn(student, teacher).item())


@pytest.mark.parametrize("base", ["cwd", "maskd"])
def test_compiled_float16_features_agree_to_float16_precision(base):
    """The compiled passes and the compiled student side (its accumulator cast back to float16, as
    the loop's) take float16 features, as under --amp."""
    loop = _steps("loop", base, "paper", "mean", 4, steps=2, dtype=torch.float16)
    _assert_same(loop, _steps("compiled", base, "paper", "mean", 4, steps=2, dtype=torch.float16), rtol=1e-2)


# ------------------------------------------------------------------------- nothing K-fold
def _buffers(code: str):
    for match in re.finditer(r"empty_strided_cpu\(\(([^)]*)\)", code):
        yield [int(x) for x in match.group(1).split(",") if x.strip()]


@pytest.mark.parametrize("name,layout", [(name, "stacked") for name in ("statistics", "cwd", "mse", "maskd", "cwd_group")]
                         + [("statistics", "unrolled"), ("maskd", "unrolled"), ("mse_group", "unrolled")])
def test_compiled_passes_store_no_avatar(name, layout):
    """The generated code allocates nothing near the size of the K Avatars: each Avatar element
    lives in registers, regenerated from the teacher and its mask in each pass. A group's call (a
    level's whole teacher side and its student side, as AKDLoss makes it) is checked forward and
    backward, values and student gradients against the eager call."""
    from torch._inductor.utils import run_and_get_code

    n, c, h, w, k = 2, 32, 40, 10, 8
    torch.manual_seed(0)
    teacher = torch.randn(n, c, h, w)
    keys = counter_rng.avatar_keys(torch.tensor(5), torch.arange(k))
    affines = [("mul", None, torch.rand(k, c) + 0.5)]
    weights = torch.rand(k, n) + 0.5
    drop = counter_rng.Drop.of(0.1)
    if name.endswith("_group"):
        teachers = [teacher, torch.randn(n, c, h // 2, w)]
        base = name[:-len("_group")]
        bases = list(AKDLoss(base=base, num_avatars=k).base_losses)[:1] * 2
        students = [torch.randn(t.shape, requires_grad=True) for t in teachers]
        # the paper's scale (two levels in one call); the release's factor and the inverse-variance
        # weights, whose statistics come in the call
        extra = (1.0, 0.1) if base == "cwd" else ()
        scales = [torch.rand(1, c, 1, 1) + 0.5 if base == "cwd" else None for _ in teachers]
        arguments = [(t, keys, scale, None, extra) for t, scale in zip(teachers, scales)]
        keywords = dict(drop=drop, standardised=base != "cwd", pearson=base != "cwd",
                        weighting="mean" if base == "cwd" else "inverse_variance", layout=layout)
        # the student as AKDLoss hands it over: prepared in the call, under its factor
        factor = "paper" if base == "cwd" else "release"

        def run(function):
            losses = function(bases, [(s, scale, factor) for s, scale in zip(students, scales)], arguments, keywords,
                              [t.dtype for t in teachers])
            gradients = torch.autograd.grad(torch.stack(losses).sum(), students)
            return [loss.detach() for loss in losses] + list(gradients)

        compiled = torch.compile(fused.FUNCTIONS[name], dynamic=False, fullgraph=True, options=fused.COMPILE_OPTIONS)
        result, codes = run_and_get_code(run, compiled)
        expected = run(fused.FUNCTIONS[name])
        assert len(codes) == 2, "a forward and a backward graph"
    else:
        arguments = {"statistics": (teacher, keys, drop, True, True, True),
                     "cwd": (teacher, keys, drop, affines, weights, 1.0, 0.1),
                     "mse": (teacher, keys, drop, affines, weights),
                     "maskd": (teacher, keys, drop, affines, weights, ReceptiveTokens(c, 6), None)}[name]
        compiled = torch.compile(fused.FUNCTIONS[name], dynamic=False, fullgraph=True, options=fused.COMPILE_OPTIONS)
        with torch.no_grad():
            result, codes = run_and_get_code(compiled, *arguments, layout=layout)
            expected = fused.FUNCTIONS[name](*arguments, layout=layout)
    for a, b in zip(torch.utils._pytree.tree_leaves(result), torch.utils._pytree.tree_leaves(expected)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    one_map = n * c * h * w
    sizes = [math.prod(shape) for code in codes for shape in _buffers(code)]
    assert sizes, "no buffers found: the generated code's form changed"
    # K Avatars would be 8 maps. What grows with K is reduced: MasKD's token masks (K x N x T x H x W,
    # K * T / C of a map: 1.5 here, 0.19 on 256-channel FPNs) and its window sums over rows (K / H)
    assert max(sizes) <= 1.6 * one_map, sorted(sizes)[-3:]


def _maskd_terms_code(k: int, layout: str) -> list:
    """The generated code of MasKD's pass over K Avatars of a small map, compiled for its sizes, once
    its values are checked against the eager pass's."""
    from torch._inductor.utils import run_and_get_code

    n, c, h, w = 2, 16, 12, 10
    torch.manual_seed(0)
    keys = counter_rng.avatar_keys(torch.tensor(5), torch.arange(k))
    arguments = (torch.randn(n, c, h, w), keys, counter_rng.Drop.of(0.1), [("mul", None, torch.rand(k, c) + 0.5)],
                 torch.rand(k, n) + 0.5, ReceptiveTokens(c, 6), None)
    compiled = torch.compile(fused.FUNCTIONS["maskd"], dynamic=False, fullgraph=True, options=fused.COMPILE_OPTIONS)
    with torch.no_grad():
        result, codes = run_and_get_code(compiled, *arguments, layout=layout)
        expected = fused.FUNCTIONS["maskd"](*arguments, layout=layout)
    for a, b in zip(result, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    return codes


@pytest.mark.parametrize("layout", fused.LAYOUTS)
def test_maskds_token_weights_are_one_head_call_for_all_avatars(layout):
    """MasKD's token weights end in the head's products (a matrix product and a convolution), which
    inductor leaves to external kernels: one call each per level for all K Avatars, also unrolled,
    where each Avatar is its own group (per group, they were 2 K calls: host time on a GPU)."""
    calls = [call for code in _maskd_terms_code(4, layout) for call in re.findall(r"extern_kernels\.\w+", code)]
    assert 1 <= len(calls) <= 2, calls


@pytest.mark.parametrize("layout", fused.LAYOUTS)
def test_maskds_kernel_launches_do_not_grow_with_the_avatar_count(layout):
    """Past the reads of the teacher, MasKD's pass works on all Avatars' results at once (the token
    weights' window sums, the masks' sums, the position weights, the constant): per Avatar, each of
    those steps was a kernel launch of its own on a GPU: with 8 Avatars, 24 of a level's 38 (tiny
    maps, bench/RESULTS.md). Counted in the GPU's code form, Triton's: tests/test_triton_interpret.py runs
    this test under Triton's interpreter. Inductor's C++ code writes a cat's inputs as a loop each
    (the K Avatars' masks), so there the count grows with K whatever the pass does, and costs no
    launch."""
    if os.environ.get("AKD_TRITON_INTERPRET") != "1":
        pytest.skip("counts Triton's kernel launches: tests/test_triton_interpret.py runs it under Triton's interpreter")
    launches = {}
    for k in (2, 4):
        codes = _maskd_terms_code(k, layout)
        assert all("@triton.jit" in code for code in codes), "the code is not Triton's"
        launches[k] = sum(len(re.findall(r"\.run\(", code)) for code in codes)
    assert launches[2] == launches[4] > 0, launches


def test_mses_kernel_launches_do_not_grow_with_the_avatar_count():
    """MSE's constant (the Avatars' mean square) is summed over positions per Avatar, then over
    Avatars and channels for all at once. Summed over each image per Avatar, its reduction split in
    two on a GPU, the second stage a launch per Avatar in the loss's graph: with 8 Avatars at
    R50-FPN shapes, 40 of 97 launches (bench/RESULTS.md). The loss's own graph, forward, for one
    level whose image sums split as a GPU's would (C x H x W = 8704 elements, 2 outputs) and whose
    channel sums do not (272 outputs: inductor splits below twice an H100's 132 SMs). Under Triton's
    interpreter (tests/test_triton_interpret.py), for the reason the MasKD test above gives."""
    if os.environ.get("AKD_TRITON_INTERPRET") != "1":
        pytest.skip("counts Triton's kernel launches: tests/test_triton_interpret.py runs it under Triton's interpreter")
    from torch._inductor.utils import run_and_get_code

    launches = {}
    for k in (3, 4):
        torch._dynamo.reset()  # a graph compiled before for these settings would be reused: no code
        torch.manual_seed(0)
        loss_fn = AKDLoss(base="mse", num_avatars=k, uncertainty="release", avatar_kernel="compiled")
        student, teacher = torch.randn(2, 136, 8, 8), torch.randn(2, 136, 8, 8)
        with torch.no_grad():
            _, codes = run_and_get_code(loss_fn, [student], [teacher])
        assert codes and all("@triton.jit" in code for code in codes), "the code is not Triton's"
        launches[k] = sum(len(re.findall(r"\.run\(", code)) for code in codes)
    assert launches[3] == launches[4] > 0, launches


def test_combo_kernels_equal_the_loop_in_fewer_launches(monkeypatch):
    """fused.COMBO_KERNELS compiles the passes with inductor's combo kernels (a graph's independent
    kernels, each level's in a group of levels, as one launch): the loop's values all the same. In
    Triton's code form (tests/test_triton_interpret.py runs this under Triton's interpreter, whose
    harness groups the CPU tensors' kernels as a GPU's) the loss launches fewer kernels; inductor's
    C++ code has no combo kernels, and there only the values are checked."""
    from torch._inductor.utils import run_and_get_code

    case = ("cwd", "release", "mean", 2)
    loop = _steps("loop", *case)
    launches = {}
    for combo in (False, True):
        torch._dynamo.reset()  # graphs compiled before for these settings would be reused: no code
        monkeypatch.setattr(fused, "COMBO_KERNELS", combo)
        compiled, codes = run_and_get_code(lambda: _steps("compiled", *case))
        _assert_same(loop, compiled)
        launches[combo] = sum(len(re.findall(r"\.run\(", code)) for code in codes)
    if os.environ.get("AKD_TRITON_INTERPRET") == "1":
        assert 0 < launches[True] < launches[False], launches


def test_compiled_token_weights_do_not_guard_on_the_map_count():
    """MasKD's token weights compiled (as in its passes, where the maps are K x N Avatars' and
    images') serve any number of maps with one graph. Its 1x1 head run as a convolution had torch's
    choice of convolution backend guard on fewer than 16 maps: a recompilation at 16, and a bound
    on the count that, with one Avatar, made inductor write a persistent reduction over the batch
    size, which its combo kernels fail to compile (torch 2.13, pytorch/pytorch#187269)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    tokens = ReceptiveTokens(8, num_tokens=3)
    counter = CompileCounter()
    weights = torch.compile(tokens.weights_of_windows, backend=counter, dynamic=True, fullgraph=True)
    for maps in (2, 3, 20):
        windows = torch.randn(maps, 8, 3, 3)
        got = weights(windows, 30)
        assert torch.allclose(got, tokens.weights_of_windows(windows, 30), rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 2, 3 and 20 maps"


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,message", [
    (dict(base="fgd", avatar_kernel="compiled", channels=16), "not a weighted sum"),
    (dict(base="cwd", avatar_kernel="compiled", avatar_rng="torch"), "needs avatar_rng='counter'"),
    (dict(base="cwd", avatar_kernel="fused", perturbation="noise"), "dropout"),
    (dict(base="cwd", avatar_rng="counter", perturbation="channel"), "dropout"),
    (dict(base="cwd", avatar_kernel="triton"), "unknown avatar kernel"),
    (dict(base="cwd", avatar_rng="philox"), "unknown avatar rng"),
])
def test_settings_the_passes_cannot_serve_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AKDLoss(**kwargs)


def test_the_loop_with_torchs_generator_is_unchanged_by_default():
    loss_fn = AKDLoss(base="cwd", num_avatars=2, uncertainty="none")
    assert (loss_fn.avatar_kernel, loss_fn.avatar_rng) == ("loop", "torch")
    teacher, student = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.manual_seed(7)
    value = loss_fn(student, teacher)
    torch.manual_seed(7)
    a, b = make_avatar(teacher), make_avatar(teacher)  # torch's dropout, drawn in the loop's order
    base = loss_fn.base_losses[0]
    expected = (base(student, a) + base(student, b)) / 2
    assert torch.allclose(value, expected, rtol=1e-5)


# ------------------------------------------------------------------------------ akd train
def test_akd_train_runs_the_compiled_passes(synth_root, teacher_checkpoint, tmp_path):
    """A real run with the compiled passes: config, distiller, the paper's sigma, the log."""
    import json

    from conftest import TINY, run_akd

    result = run_akd("train", "--preset", TINY, "--data-root", synth_root, "--work-dir", tmp_path, "--epochs", 1,
                     "--batch-size", 4, "--cfg-options", "log_config.interval=1", "--no-validate",
                     "--teacher-checkpoint", teacher_checkpoint, "--num-avatars", 2, "--uncertainty", "paper",
                     "--avatar-kernel", "compiled", cwd=tmp_path)
    assert "done: student checkpoint" in result.stdout
    assert "avatar_kernel='compiled'" in (tmp_path / "config.py").read_text()
    records = [json.loads(line) for path in tmp_path.glob("*.log.json")
               for line in path.read_text().splitlines() if line.startswith("{")]
    losses = [r["loss_akd_cwd_fpn"] for r in records if r.get("mode") == "train"]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)
    assert any(r.get("sigma_fpn_l0", 0) > 0 for r in records)


@pytest.mark.parametrize("args,message", [
    (["--method", "fgd"], "not a weighted sum"),
    (["--perturbation", "noise"], "dropout Avatars"),
    (["--avatar-kernel", "triton"], "--avatar-kernel"),
])
def test_akd_refuses_what_the_compiled_passes_cannot_serve(args, message):
    from conftest import refused

    extra = [] if "--avatar-kernel" in args else ["--avatar-kernel", "compiled"]
    assert message in refused("config", "--preset", "fcos-r101-r50", *extra, *args)


def test_a_broken_compiler_is_one_line_naming_the_way_out():
    from torch._inductor import config

    from akd_cli.mm.checks import friendly_message

    fused._compiled.clear()  # compile afresh, with a C++ compiler that does not exist
    loss_fn = AKDLoss(base="mse", num_avatars=2, avatar_kernel="compiled", uncertainty="none")
    try:
        with config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}), \
                pytest.raises(Exception) as failure:
            loss_fn(torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 4, 6, 6))
    finally:
        fused._compiled.clear()
        torch._dynamo.reset()
    message = friendly_message(failure.value)
    assert message and "--avatar-kernel loop" in message and "\n" not in message

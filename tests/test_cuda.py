"""On a CUDA machine: mmcv-full's compiled CUDA ops against their CPU twins, the base losses on the
GPU, `akd train --amp` and `akd eval` on the GPU, and one NCCL worker through mmdet's distributed
path. Skipped where torch sees no GPU (CI has none); run them with `make test` there. The core under
CUDA autocast is tested beside its CPU twin in test_core.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from akd_cli import AKDLoss
from akd_cli.core import BASE_LOSSES, counter_rng, fused
from conftest import TINY, run_akd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TESTS = Path(__file__).resolve().parent


def test_mmcv_ops_are_compiled_for_the_cuda_of_torch():
    from mmcv.ops import get_compiler_version, get_compiling_cuda_version

    compiled = get_compiling_cuda_version()
    assert compiled != "not available", "mmcv-full was built without CUDA ops"
    assert compiled.split(".")[0] == torch.version.cuda.split(".")[0], (compiled, torch.version.cuda)
    assert get_compiler_version()


def test_cuda_nms_roi_align_and_deform_conv_agree_with_the_cpu_ops():
    from mmcv.ops import DeformConv2d, RoIAlign, nms

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=g) * 60], dim=1)
    scores = torch.rand(300, generator=g)
    _, keep_cpu = nms(boxes, scores, iou_threshold=0.5)
    _, keep_gpu = nms(boxes.cuda(), scores.cuda(), iou_threshold=0.5)
    assert 0 < len(keep_cpu) < 300
    assert torch.equal(keep_gpu.cpu(), keep_cpu)

    feats = torch.randn(2, 8, 40, 48, generator=g)
    rois = torch.tensor([[0, 3.0, 4.0, 30.0, 25.0], [1, 0.5, 0.5, 47.0, 39.0], [1, 10.2, 7.7, 18.9, 33.1]])
    align = RoIAlign((7, 7), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    assert torch.allclose(align(feats.cuda(), rois.cuda()).cpu(), align(feats, rois), atol=1e-5)

    torch.manual_seed(0)
    conv = DeformConv2d(8, 16, kernel_size=3, padding=1)
    offset = torch.randn(2, 18, 40, 48, generator=g) * 2
    expected = conv(feats, offset)
    got = conv.cuda()(feats.cuda(), offset.cuda()).cpu()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_cuda_sigmoid_focal_loss_matches_mmdets_python_formula():
    from mmcv.ops import sigmoid_focal_loss
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(500, 6, generator=g)
    labels = torch.randint(0, 7, (500,), generator=g)  # 6 = background
    one_hot = torch.nn.functional.one_hot(labels, 7)[:, :6].float()
    expected = py_sigmoid_focal_loss(pred, one_hot, gamma=2.0, alpha=0.25, reduction="sum")
    got = sigmoid_focal_loss(pred.cuda(), labels.cuda(), 2.0, 0.25, None, "sum")
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def _fpn_like(seed, n=2, channels=32, size=(100, 136)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, size[0] // 2 ** i, size[1] // 2 ** i, generator=g) * 3 for i in range(3)]


def _kwargs(base, channels=32):
    return {"channels": channels, "num_levels": 3} if BASE_LOSSES[base].needs_channels else {}


def _context(base):
    if base != "fgd":
        return {}
    boxes = [torch.tensor([[4.0, 4.0, 60.0, 40.0]]).cuda(), torch.tensor([[10.0, 20.0, 90.0, 80.0]]).cuda()]
    return {"gt_bboxes": boxes, "img_shape": (100, 136)}


@pytest.mark.parametrize("base", sorted(set(BASE_LOSSES) - {"mgd"}))
def test_base_losses_on_the_gpu_equal_the_cpu_values(base):
    """MGD draws a random mask, so its value is device-dependent by design; the others are exact."""
    student, teacher = _fpn_like(0), _fpn_like(1)
    torch.manual_seed(0)
    loss = AKDLoss(base=base, num_avatars=0, **_kwargs(base))
    ctx_cpu = {k: ([b.cpu() for b in v] if k == "gt_bboxes" else v) for k, v in _context(base).items()}
    on_cpu = loss(student, teacher, **ctx_cpu).item()
    on_gpu = loss.cuda()([s.cuda() for s in student], [t.cuda() for t in teacher], **_context(base)).item()
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)


def test_akd_train_with_amp_on_the_gpu_then_eval_on_the_gpu(synth_root, teacher_checkpoint, tmp_path):
    work = tmp_path / "amp"
    result = run_akd("train", "--preset", TINY, "--data-root", synth_root, "--work-dir", work, "--epochs", 1,
                     "--batch-size", 4, "--teacher-checkpoint", teacher_checkpoint, "--num-avatars", 2, "--amp",
                     "--cfg-options", "log_config.interval=1", cwd=tmp_path)
    assert "done: student checkpoint" in result.stdout
    log = "".join(p.read_text() for p in work.glob("*.log"))
    assert "1 worker(s) on cuda" in log, log[-2000:]
    records = [json.loads(line) for p in work.glob("*.log.json") for line in p.read_text().splitlines()
               if line.startswith("{") and '"mode": "train"' in line]
    assert records and all(math.isfinite(r["loss_akd_cwd_fpn"]) and r["loss_akd_cwd_fpn"] > 0 for r in records)
    full = torch.load(work / "latest.pth", map_location="cpu", weights_only=True)
    assert full["meta"]["fp16"]["loss_scaler"]["scale"] > 0, "mixed precision ran through mmcv's Fp16OptimizerHook"

    metrics = tmp_path / "metrics.json"
    run_akd("eval", work / "student.pth", "--out", metrics, cwd=tmp_path)
    record = json.loads(metrics.read_text())
    assert record["device"] == "cuda" and record["dataset"]["images"] == 8
    assert 0.0 <= record["metrics"]["AP"] <= 1.0


def test_one_nccl_worker_trains_and_evaluates_through_mmdets_distributed_path(synth_root, teacher_checkpoint):
    from akd_cli.mm.launch import free_port

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(TESTS / "nccl_worker.py"), str(synth_root), str(teacher_checkpoint)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["param_device"] == "cuda:0"
    assert math.isfinite(report["log_vars"]["loss"]) and report["log_vars"]["loss_akd_cwd_fpn"] > 0
    assert report["results"] == report["images"] == 8, "every image's detections gathered over NCCL"
    assert report["classes_per_result"] == [6] * 8
    # one step from random weights may detect nothing, and then mmdet reports no mAP
    assert (report["detections"] == 0) == (report["bbox_mAP"] is None)


# The fused Avatar passes as Triton kernels (inductor on CUDA): the loop's values and gradients
# (tests/test_fused.py checks them through inductor's CPU backend), and no K-fold memory.
@pytest.mark.parametrize("base,uncertainty", [("cwd", "paper"), ("mse", "release"), ("maskd", "release"),
                                              ("cwd", "release"), ("pkd", "paper")])
def test_compiled_avatar_passes_equal_the_loop_on_cuda(base, uncertainty):
    from test_fused import _assert_same, _steps

    shapes = [(2, 256, 100, 168), (2, 256, 50, 84), (2, 256, 7, 11)]
    run = dict(steps=2, drop_rate=0.1, shapes=shapes, device="cuda")
    _assert_same(_steps("loop", base, uncertainty, "mean", 8, **run),
                 _steps("compiled", base, uncertainty, "mean", 8, **run))


@pytest.mark.parametrize("base,uncertainty,avatars", [("cwd", "release", 8), ("mse", "release", 8),
                                                      ("maskd", "release", 8), ("maskd", "release", 1)])
def test_combo_kernel_avatar_passes_equal_the_loop_on_cuda(monkeypatch, base, uncertainty, avatars):
    """The passes compiled with inductor's combo kernels (fused.COMBO_KERNELS, what gpu_check.sh times as
    ``compiled+combo``), as a GPU's Triton code: the loop's values, gradients and running sigma. MasKD
    with one Avatar failed to compile with them until its token head stopped guarding on the map count
    (test_fused.py::test_compiled_token_weights_do_not_guard_on_the_map_count)."""
    from test_fused import _assert_same, _steps

    monkeypatch.setattr(fused, "COMBO_KERNELS", True)
    shapes = [(2, 256, 100, 168), (2, 256, 50, 84), (2, 256, 7, 11)]
    run = dict(steps=2, drop_rate=0.1, shapes=shapes, device="cuda")
    _assert_same(_steps("loop", base, uncertainty, "mean", avatars, **run),
                 _steps("compiled", base, uncertainty, "mean", avatars, **run))


@pytest.mark.parametrize("base", ["cwd", "maskd"])
def test_compiled_avatar_passes_take_float16_features_on_cuda(base):
    """Float16 features, as under --amp: the passes in float32, the compiled student side with its
    accumulator cast back to float16 as the loop's is; equal to the loop to float16's precision."""
    from test_fused import _assert_same, _steps

    run = dict(steps=2, drop_rate=0.1, shapes=[(2, 256, 100, 168), (2, 256, 7, 11)], device="cuda",
               dtype=torch.float16)
    _assert_same(_steps("loop", base, "paper", "mean", 8, **run), _steps("compiled", base, "paper", "mean", 8, **run),
                 rtol=1e-2)


@pytest.mark.parametrize("base,uncertainty", [("maskd", "release"), ("cwd", "paper")])
def test_the_other_layout_equals_the_loop_on_cuda(monkeypatch, base, uncertainty):
    """Each base loss's passes in the layout that is not its own (fused.PASS_LAYOUTS: MasKD's is
    unrolled, CWD's stacked), as Triton kernels: what gpu_check.sh times against its own layout must
    compute the loop's values too (its tests part runs this when the call times a forced layout)."""
    from test_fused import _assert_same, _steps

    own = fused.PASS_LAYOUTS[BASE_LOSSES[base].teacher_pass]
    monkeypatch.setattr(fused, "LAYOUT", next(layout for layout in fused.LAYOUTS if layout != own))
    shapes = [(2, 256, 100, 168), (2, 256, 7, 11)]
    run = dict(steps=2, drop_rate=0.1, shapes=shapes, device="cuda")
    _assert_same(_steps("loop", base, uncertainty, "mean", 8, **run),
                 _steps("compiled", base, uncertainty, "mean", 8, **run))


@pytest.mark.parametrize("avatars", [1, 3])
def test_compiled_passes_draw_at_each_calls_own_drop_rate_on_cuda(avatars):
    """test_fused's three drop rates in one process, as Triton kernels: no recompilation for a
    second rate may run the first rate's code (counter_rng.Drop)."""
    from test_fused import _assert_same, _steps

    for p in (0.3, 0.1, 0.5):
        run = dict(steps=1, drop_rate=p, device="cuda")
        _assert_same(_steps("loop", "mse", "paper", "mean", avatars, **run),
                     _steps("compiled", "mse", "paper", "mean", avatars, **run))


def test_compiled_avatar_passes_memory_does_not_grow_with_avatars_on_cuda():
    shape = (2, 256, 100, 168)
    map_bytes = math.prod(shape) * 4
    peaks = {}
    for avatars in (1, 8):
        loss_fn = AKDLoss(base="cwd", num_avatars=avatars, uncertainty="paper", avatar_kernel="compiled").cuda()
        student = torch.randn(shape, device="cuda", requires_grad=True)
        teacher = torch.randn(shape, device="cuda")
        loss_fn(student, teacher).backward()  # compiles
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_fn(student, teacher).backward()
        torch.cuda.synchronize()
        peaks[avatars] = torch.cuda.max_memory_allocated() - before
    assert peaks[8] <= peaks[1] + 0.1 * map_bytes, peaks


@pytest.mark.parametrize("base,uncertainty,kernel,avatars", [
    ("cwd", "paper", "loop", 1), ("cwd", "paper", "compiled", 8), ("maskd", "release", "loop", 1),
    ("maskd", "release", "compiled", 8), ("mse", "paper", "compiled", 1)])
def test_a_loss_call_synchronises_once_after_queuing_all_its_work(base, uncertainty, kernel, avatars):
    """CUDA's own sync check (test_core.py's twin counts reads on the CPU): the one sync is the
    finiteness check at the end, so the host queues the loss while the GPU still runs the forward."""
    import warnings

    shapes = [(2, 256, 100, 168), (2, 256, 50, 84), (2, 256, 7, 11)]
    options = dict(channels=256, num_levels=3, student_masks_after=1) if base == "maskd" else {}
    loss_fn = AKDLoss(base=base, num_avatars=avatars, uncertainty=uncertainty, avatar_kernel=kernel, **options).cuda()
    students = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    teachers = [torch.randn(s, device="cuda") for s in shapes]
    for _ in range(2):  # compiles (a dynamic-shape recompile may take a second call); MasKD reads its count once
        loss_fn(students, teachers).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_fn.per_level(students, teachers)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_gpu_dropout_masks_equal_the_cpus_eager_and_compiled():
    """The GPU hashes in wrapping int32 (eager and Triton), the CPU in int64: the same Avatars."""
    # one Avatar as make_avatar's counter branch draws it, with the rate as a Drop (as the passes
    # take it: a float rate inside a compiled function is specialised on, test_fused.py says why)
    def avatar(teacher, keys, drop):
        return counter_rng.dropout(teacher, counter_rng.keep_mask(teacher.shape, keys, drop), drop)

    shape = (2, 256, 100, 168)
    keys = counter_rng.avatar_keys(torch.tensor(123456789), torch.arange(8))
    on_gpu = tuple(x.cuda() for x in keys)
    first = counter_rng.avatar_keys(torch.tensor(123456789), torch.tensor(0))  # Avatar 0's keys alone
    compiled_avatar = torch.compile(avatar, dynamic=True, fullgraph=True)
    for drop in map(counter_rng.Drop.of, (0.1, 0.5)):
        expected = counter_rng.keep_mask(shape, keys, drop)
        assert torch.equal(counter_rng.keep_mask(shape, on_gpu, drop).cpu(), expected)
        teacher = torch.randn(shape)
        compiled = compiled_avatar(teacher.cuda(), tuple(x.cuda() for x in first), drop)
        assert torch.equal(compiled.cpu(), avatar(teacher, first, drop))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_features_on_the_gpu_raise_and_finite_ones_do_not(dtype):
    """The finiteness check is one min-max reduction per map (AKDLoss's _all_finite): on the GPU too,
    NaN and either infinity anywhere in a map must make it fail, and the extreme finite values not."""
    from akd_cli.core.akd import _all_finite

    shapes = [(2, 256, 100, 168), (2, 256, 7, 11)]
    students = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
    teachers = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
    teachers[0][0, 0, 0, 0], teachers[1][1, 5, 6, 7] = torch.finfo(dtype).max, torch.finfo(dtype).min
    assert bool(_all_finite(students + teachers))
    for value in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0, 0, 0), (1, 255, 99, 167), (1, 77, 50, 3)):
            broken = students[0].clone()
            broken[where] = value
            assert not bool(_all_finite([broken] + students[1:] + teachers)), (value, where)
        broken = teachers[1].clone()
        broken[1, 128, 6, 10] = value
        with pytest.raises(ValueError, match="level 1: teacher feature"):
            AKDLoss(base="mse", num_avatars=1).cuda()(students, [teachers[0], broken])

"""Each paper preset's generated config against the numbers of its source config (written here as
facts, the source named), the head-output terms against their definitions, and the recipes' parts
(head terms, the student-RoI path, modules inherited from the teacher, fixed modules) run for real
on tiny presets of the same detector families."""
import json
import math
from pathlib import Path

import pytest
import torch

from akd_cli.options import TrainOptions
from akd_cli.presets import load_preset

from conftest import refused, run_akd

MASKD = "hunto/MasKD:mmrazor/configs/distill/maskd/"
AKD = "Gumpest/AvatarKD:configs/distill/akd/"
SMOOTH_L1_ON_STUDENT_ROIS = dict(loss="smooth_l1", weight=1.0, options={"beta": 1.0})

# preset -> (source config, {dotted key of the generated config: the source's value})
FACTS = {
    "faster-rcnn-r101-r50": (MASKD + "fpn_r101-fpn_r50_coco.py", {
        "model.method": "maskd", "model.options.loss_weight": 1.0, "model.options.num_tokens": 6,
        "model.options.student_masks_after": 7330,
        "model.options.token_file": "https://github.com/Gumpest/MasKD/releases/download/v0.0.3/"
                                    "maskd_faster_rcnn_r101_fpn_2x_coco_bbox_mAP-0.398_20200504_210455-1d2dac9c.pth",
        "model.distill.0.align": True,
        "model.heads.0": dict(name="roi_reg", student="roi_head.bbox_head.fc_reg", teacher="roi_head.bbox_head.fc_reg",
                              student_inputs=dict(student="roi_head.bbox_roi_extractor",
                                                  teacher="roi_head.bbox_roi_extractor", indices=[1]),
                              **SMOOTH_L1_ON_STUDENT_ROIS),
        "model.init_from_teacher": [], "optimizer.lr": 0.02, "optimizer_config.grad_clip": None,
        "lr_config.warmup_iters": 500, "lr_config.step": [16, 22], "runner.max_epochs": 24,
    }),
    "retinanet-r101-r50": (AKD + "akd_maskd_retinanet_x101-retinanet_r50_coco.py", {
        "model.method": "maskd", "model.options.loss_weight": 7.0, "model.options.student_masks_after": 7000,
        "model.options.token_file": "https://github.com/Gumpest/MasKD/releases/download/v0.0.3/"
                                    "maskd_retinanet_r101_fpn_2x_coco_20200131-5560aee8.ckpt",
        "model.teacher_checkpoint": "https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r101_fpn_2x_coco/"
                                    "retinanet_r101_fpn_2x_coco_20200131-5560aee8.pth",
        "model.heads.0": dict(name="reg", student="bbox_head.retina_reg", teacher="bbox_head.retina_reg", loss="l1",
                              weight=1.0, options={}),
        "model.init_from_teacher": [], "optimizer.lr": 0.02, "lr_config.warmup_iters": 1000,
        "optimizer_config.grad_clip": {"max_norm": 35.0, "norm_type": 2},
    }),
    "retinanet-r101-r50-maskd": (MASKD + "retinanet_r101-retinanet_r50_coco.py", {
        "model.init_from_teacher": ["neck", "bbox_head"], "model.options.loss_weight": 7.0,
        "optimizer.lr": 0.02, "lr_config.warmup_iters": 1000,
    }),
    "fcos-r101-r50": (MASKD + "fcos_r101-fcos_r50_coco.py", {
        "model.method": "maskd", "model.options.loss_weight": 10.0, "model.options.student_masks_after": 5000,
        "model.options.token_file": "https://github.com/hunto/MasKD/releases/download/v0.0.1/"
                                    "maskd_fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco_20220530.pth",
        "model.distill.0.align": True, "model.heads": [],
        "model.student.bbox_head.norm_on_bbox": True, "model.student.bbox_head.centerness_on_reg": False,
        "model.student.bbox_head.center_sampling": True, "model.student.bbox_head.conv_bias": True,
        "model.student.bbox_head.dcn_on_last_conv": False,
        "model.student.bbox_head.loss_bbox": {"type": "GIoULoss", "loss_weight": 1.0},
        "model.student.test_cfg.nms.iou_threshold": 0.6, "model.teacher.test_cfg.nms.iou_threshold": 0.5,
        "optimizer.lr": 0.01, "optimizer.paramwise_cfg.bias_lr_mult": 2.0,
        "optimizer.paramwise_cfg.bias_decay_mult": 0.0,
        "optimizer_config.grad_clip": {"max_norm": 35.0, "norm_type": 2},
        "lr_config.warmup": "linear", "lr_config.warmup_iters": 500, "lr_config.warmup_ratio": 1.0 / 3,
    }),
    "cascade-mask-rcnn-x101-faster-rcnn-r50": (AKD + "akd_mgd_cascade_mask_rcnn_x101-fpn_x50_coco.py", {
        "model.method": "mgd", "model.options.alpha_mgd": 2e-5, "model.options.lambda_mgd": 0.65,
        "model.student.roi_head.bbox_head.reg_class_agnostic": True,
        "model.heads.0": dict(name="roi_reg", student="roi_head.bbox_head.fc_reg",
                              teacher="roi_head.bbox_head.0.fc_reg",
                              student_inputs=dict(student="roi_head.bbox_roi_extractor",
                                                  teacher="roi_head.bbox_roi_extractor.0", indices=[1]),
                              **SMOOTH_L1_ON_STUDENT_ROIS),
        "model.heads.1.loss": "dist", "model.heads.1.options": {"beta": 1.0, "gamma": 1.0},
        "model.heads.1.teacher": "roi_head.bbox_head.0.fc_cls",
        "model.init_from_teacher": ["neck", "rpn_head"],
        "optimizer_config.grad_clip": {"max_norm": 35.0, "norm_type": 2},
        # distiller.losses lr_mult 0: MGD's generation block stays as initialised, as in the release
        "optimizer.paramwise_cfg.custom_keys.akd_losses": {"lr_mult": 0.0, "decay_mult": 0.0},
    }),
    "cascade-mask-rcnn-x101-faster-rcnn-r50-maskd": (MASKD + "cascade_mask_rcnn_x101-fpn_x50_coco.py", {
        "model.method": "maskd", "model.options.loss_weight": 1.0, "model.options.student_masks_after": 5000,
        "model.init_from_teacher": [], "optimizer_config.grad_clip": None, "model.heads.1": None,
    }),
    "retinanet-x101-r50": (MASKD + "retinanet_x101-retinanet_r50_coco.py", {
        "model.options.loss_weight": 7.0, "model.options.student_masks_after": 8500,
        "model.teacher_checkpoint": "https://download.openmmlab.com/mmdetection/v2.0/retinanet/"
                                    "retinanet_x101_64x4d_fpn_mstrain_3x_coco/"
                                    "retinanet_x101_64x4d_fpn_mstrain_3x_coco_20210719_051838-022c2187.pth",
        "model.heads.0.loss": "smooth_l1", "model.heads.0.weight": 1.0,
        "model.init_from_teacher": ["neck", "bbox_head"], "optimizer.lr": 0.02, "lr_config.warmup_iters": 1000,
        "optimizer_config.grad_clip": {"max_norm": 35.0, "norm_type": 2},
    }),
    "reppoints-x101-r50": (AKD + "akd_cwd_reppoints_x101-reppoints-r50_coco.py", {
        "model.method": "cwd", "model.options": {"tau": 1.0, "loss_weight": 7.5},
        "model.heads.0": dict(name="reg_refine", student="bbox_head.reppoints_pts_refine_out",
                              teacher="bbox_head.reppoints_pts_refine_out", loss="smooth_l1", weight=0.2,
                              options={"beta": 0.11}),
        "model.heads.1.weight": 0.1, "model.heads.1.student": "bbox_head.reppoints_pts_init_out",
        "model.init_from_teacher": ["neck", "bbox_head"], "optimizer.lr": 0.01, "optimizer_config.grad_clip": None,
    }),
    "reppoints-x101-r50-maskd": (MASKD + "reppoints_x101-reppoints-r50_coco.py", {
        "model.method": "maskd", "model.options.loss_weight": 10.0, "model.options.student_masks_after": 5000,
        "model.init_from_teacher": [], "optimizer.lr": 0.01,
    }),
}
ALL_ROWS = {"avatars": {"num_avatars": 1, "drop_rate": 0.1, "uncertainty": "release", "weighting": "mean",
                        "perturbation": "dropout", "sigma_momentum": 0.1}}


def _at(cfg, key):
    node = cfg
    for part in key.split("."):
        if isinstance(node, list):
            index = int(part)
            if index >= len(node):
                return None
            node = node[index]
        else:
            node = node.get(part)
    return node


@pytest.mark.parametrize("name", sorted(FACTS))
def test_generated_config_carries_the_source_configs_recipe(name):
    from akd_cli.mm.config import build_config

    preset = load_preset(name)
    source, facts = FACTS[name]
    assert source in preset.sources["recipe"], f"{name} cites {preset.sources['recipe']}, the facts {source}"
    cfg = build_config(preset, TrainOptions(preset=name))._cfg_dict.to_dict()
    for key, expected in facts.items():
        got = _at(cfg, key)
        if isinstance(expected, float):
            assert got == pytest.approx(expected), f"{name}: {key} = {got!r}, {source} says {expected!r}"
        else:
            assert got == expected, f"{name}: {key} = {got!r}, {source} says {expected!r}"
    assert cfg["model"]["avatars"] == ALL_ROWS["avatars"]
    assert cfg["optimizer"]["paramwise_cfg"]["custom_keys"]["akd_losses"] == {"lr_mult": 0.0, "decay_mult": 0.0}


def test_another_method_on_a_preset_keeps_none_of_the_rows_own_terms():
    from akd_cli.mm.config import build_config

    cfg = build_config(load_preset("reppoints-x101-r50"), TrainOptions(preset="reppoints-x101-r50", method="mse"))
    assert cfg.model.heads == [] and cfg.model.init_from_teacher == []
    assert "custom_keys" not in (cfg.optimizer.get("paramwise_cfg") or {})


# --- head-output terms ----------------------------------------------------------------------------

def test_l1_and_smooth_l1_equal_mmdets_own_losses():
    from mmdet.models.losses import L1Loss, SmoothL1Loss

    from akd_cli.core.head_losses import build_head_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 24, generator=g), torch.randn(7, 24, generator=g) * 0.3
    assert build_head_loss("l1", weight=2.0)(s, t).item() == pytest.approx(L1Loss(loss_weight=2.0)(s, t).item(), rel=1e-6)
    for beta in (1.0, 0.11):
        ours = build_head_loss("smooth_l1", weight=0.2, beta=beta)(s, t).item()
        assert ours == pytest.approx(SmoothL1Loss(beta=beta, loss_weight=0.2)(s, t).item(), rel=1e-6)


def test_dist_matches_its_definition_and_is_zero_for_equal_logits():
    from akd_cli.core.head_losses import build_head_loss

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(9, 7, generator=g), torch.randn(9, 7, generator=g)
    p_s, p_t = s.softmax(1), t.softmax(1)

    def pearson(a, b):  # per row, written out
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    expected = 1.0 * (1 - pearson(p_s, p_t).mean()) + 2.0 * (1 - pearson(p_s.t(), p_t.t()).mean())
    dist = build_head_loss("dist", weight=0.5, beta=1.0, gamma=2.0)
    assert dist(s, t).item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert dist(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # an affine map of the logits per sample changes the probabilities; a shift does not
    assert dist(s + 3.0, s).item() == pytest.approx(0.0, abs=1e-6)


def test_head_terms_carry_no_gradient_to_the_teacher():
    from akd_cli.core.head_losses import build_head_loss

    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    for kind in ("l1", "smooth_l1", "dist"):
        build_head_loss(kind)(s, t).backward()
    assert s.grad is not None and t.grad is None


# --- the recipes' parts, run for real on tiny presets of the same families --------------------------

def _train_teacher(preset, synth_root, work):
    run_akd("train", "--preset", preset, "--train-teacher", "--data-root", synth_root, "--work-dir", work,
            "--epochs", 1, "--batch-size", 4, "--no-validate", cwd=work.parent)
    return work / "student.pth"


def _log_records(work: Path):
    records = []
    for path in sorted(work.glob("*.log.json")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [r for r in records if r.get("mode") == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("preset, terms, inherited", [
    ("tiny-retinanet-r34-r18", ["loss_kd_reg"], ["neck", "bbox_head"]),
    ("tiny-faster-rcnn-r34-r18", ["loss_kd_roi_reg", "loss_kd_roi_cls"], ["neck", "rpn_head"]),
])
def test_head_terms_student_rois_and_inherited_modules_train_for_real(preset, terms, inherited, synth_root, tmp_path):
    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from mmdet.models import build_detector

    teacher = _train_teacher(preset, synth_root, tmp_path / "teacher")
    # the student starts with the teacher's weights under the inherited prefixes, and only there
    cfg = build_config(load_preset(preset), TrainOptions(preset=preset, teacher_checkpoint=str(teacher)))
    model = build_detector(cfg.model)
    model.init_weights()
    t_state, s_state = model.teacher.state_dict(), model.student.state_dict()
    for prefix in inherited:
        keys = [k for k in s_state if k.startswith(prefix + ".")]
        assert keys and all(torch.equal(s_state[k], t_state[k]) for k in keys), prefix
    assert not torch.equal(s_state["backbone.conv1.weight"][:, :, :3, :3], t_state["backbone.conv1.weight"][:, :, :3, :3])

    work = tmp_path / "student"
    run_akd("train", "--preset", preset, "--data-root", synth_root, "--work-dir", work, "--epochs", 1,
            "--batch-size", 4, "--teacher-checkpoint", teacher, "--no-validate",
            "--cfg-options", "log_config.interval=1", cwd=tmp_path)
    records = _log_records(work)
    assert records
    for term in terms + ["loss_akd_cwd_fpn"]:
        values = [r[term] for r in records]
        assert all(math.isfinite(v) and v >= 0 for v in values) and any(v > 0 for v in values), (term, values)


@pytest.mark.parametrize("edit, message", [
    (("student: bbox_head.retina_reg", "student: bbox_head.retina_regs"),
     "tiny-retinanet-r34-r18.yaml: distill.heads[0].student: student has no module 'bbox_head.retina_regs'; "
     "did you mean bbox_head.retina_reg"),
    (("init_from_teacher: [neck, bbox_head]", "init_from_teacher: [neck, box_head]"),
     "distill.init_from_teacher[1]: student has no module 'box_head'; did you mean bbox_head"),
])
def test_wrong_names_in_a_preset_name_the_file_the_field_and_the_closest(edit, message, synth_root, teacher_checkpoint,
                                                                         tmp_path):
    text = Path(load_preset("tiny-retinanet-r34-r18").path).read_text().replace(*edit)
    path = tmp_path / "tiny-retinanet-r34-r18.yaml"
    path.write_text(text)
    got = refused("train", "--preset", path, "--data-root", synth_root, "--teacher-checkpoint", teacher_checkpoint,
                  "--work-dir", tmp_path / "w", cwd=tmp_path)
    assert message in got
    assert not (tmp_path / "w" / "epoch_1.pth").exists()


# --- another base loss on a preset: that method's own settings for the preset's family ------------

@pytest.mark.parametrize("preset, method, facts", [
    ("retinanet-r101-r50", "mgd", {
        "model.options": {"alpha_mgd": 2e-5, "lambda_mgd": 0.65}, "model.init_from_teacher": ["neck", "bbox_head"],
        "model.distill.0.student": [f"neck.fpn_convs.{i}.conv" for i in range(5)],
        "optimizer_config.grad_clip": {"max_norm": 35.0, "norm_type": 2}, "model.heads": []}),
    ("faster-rcnn-r101-r50", "mgd", {
        "model.options": {"alpha_mgd": 5e-7, "lambda_mgd": 0.45}, "model.init_from_teacher": [],
        "model.distill.0.student": [f"neck.fpn_convs.{i}.conv" for i in range(4)],
        "model.distill.0.channels": [256] * 4}),
    ("faster-rcnn-r101-r50", "pkd", {"model.options": {"loss_weight": 6.0}, "model.distill.0.student": "neck",
                                     "model.distill.0.levels": [0, 1, 2, 3]}),
    ("fcos-r101-r50", "fgd", {"model.options": {"temp": 0.8, "alpha_fgd": 1.6e-3, "beta_fgd": 8e-4, "gamma_fgd": 8e-4,
                                                "lambda_fgd": 8e-6}}),
    ("retinanet-x101-r50", "fgd", {"model.options.alpha_fgd": 1e-3, "model.options.lambda_fgd": 5e-6}),
    ("reppoints-x101-r50", "maskd", {"model.options": {"loss_weight": 10.0, "student_masks_after": 5000}}),
    ("faster-rcnn-r101-r50", "cwd", {"model.options": {"tau": 1.0, "loss_weight": 10.0}}),
])
def test_method_takes_its_own_settings_for_the_presets_family(preset, method, facts):
    from akd_cli.mm.config import build_configs

    configs = build_configs(load_preset(preset), TrainOptions(preset=preset, method=method))
    cfg = configs.run._cfg_dict.to_dict()
    for key, expected in facts.items():
        assert _at(cfg, key) == expected, (key, _at(cfg, key))
    assert any("its own settings" in note for note in configs.notes)


def test_a_method_without_a_setting_for_the_family_is_said_and_takes_the_losss_defaults():
    from akd_cli.mm.config import build_configs

    configs = build_configs(load_preset("fcos-r101-r50"), TrainOptions(preset="fcos-r101-r50", method="mgd"))
    assert configs.run.model.options == {} and "published no fcos setting" in configs.notes[0]


@pytest.mark.parametrize("method", ["mgd", "pkd", "fgd"])
def test_method_settings_run_a_training_step_on_a_tiny_preset(method):
    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from mmdet.models import build_detector

    preset = "tiny-retinanet-r34-r18" if method != "pkd" else "tiny-faster-rcnn-r34-r18"
    cfg = build_config(load_preset(preset), TrainOptions(preset=preset, method=method))
    model = build_detector(cfg.model)
    model.train()
    img = torch.randn(2, 3, 128, 96)
    metas = [dict(img_shape=(128, 96, 3), ori_shape=(128, 96, 3), pad_shape=(128, 96, 3), scale_factor=1.0,
                  flip=False, batch_input_shape=(128, 96)), dict(img_shape=(100, 80, 3), ori_shape=(100, 80, 3),
                  pad_shape=(128, 96, 3), scale_factor=1.0, flip=False, batch_input_shape=(128, 96))]
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 70.0]]), torch.tensor([[5.0, 20.0, 40.0, 90.0]])]
    losses = model.forward_train(img, metas, boxes, [torch.tensor([1]), torch.tensor([2])])
    term = losses[f"loss_akd_{method}_fpn"]
    assert torch.isfinite(term) and term > 0
    term.backward()


def test_fgd_maps_each_images_boxes_by_its_own_shape_and_initialises_as_fgd():
    from akd_cli.core.losses import FGDLoss

    fgd = FGDLoss(channels=8)
    feature = torch.zeros(2, 8, 8, 8)
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    fg, _ = fgd._masks(feature, [box, box], [(64, 64), (32, 32)])
    assert fg[0].gt(0).sum() < fg[1].gt(0).sum()  # the same box covers all of the second, smaller image
    assert fg[1].gt(0).all()
    for block in (fgd.channel_add_s, fgd.channel_add_t):
        assert block[-1].weight.abs().sum() == 0 and block[-1].bias.abs().sum() == 0
    fan_in = fgd.conv_mask_s.weight[0].numel()
    assert fgd.conv_mask_s.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.5)

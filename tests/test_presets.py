"""Presets: validation on load, lookup, the paper's numbers, and that every preset builds and trains a step."""

import numpy as np
import pytest

from akd_cli.errors import UserError
from akd_cli.presets import PresetError, list_presets, load_preset, load_preset_file, preset_paths

from conftest import REPO, TINY

PAPER_README = REPO.parent / "shared" / "reference" / "AvatarKD-README.md"
FULL = sorted(p.name for p in list_presets() if p.table)  # one per row of the paper's tables


def test_there_is_a_preset_for_each_row_of_the_papers_tables():
    presets = {p.name: p for p in list_presets()}
    assert {p.table for p in presets.values() if p.table} == {"baseline", "stronger"}
    assert sum(p.table == "baseline" for p in presets.values()) == 3
    assert sum(p.table == "stronger" for p in presets.values()) == 3
    assert any(p.tiny for p in presets.values())
    for name in FULL:
        p = presets[name]
        assert p.teacher.checkpoint.startswith("https://download.openmmlab.com/mmdetection/v2.0/")
        assert p.student.config.startswith("mmdet://") and p.epochs == 24
        assert None not in (p.student.reference_map, p.teacher.reference_map, p.reference_akd_map)
        assert p.sources.get("recipe") and p.uncertainty == "release", "the release's factor produced the numbers"
    for p in presets.values():  # variants name a row's preset and are not rows themselves
        if p.variant_of:
            assert p.variant_of in presets and p.table is None and p.sources.get("recipe")


@pytest.mark.parametrize("spelling, name", [("fcos-r101-to-r50", "fcos-r101-r50"),
                                            ("tiny-fcos-r34-to-r18", "tiny-fcos-r34-r18"),
                                            ("cascade-mask-rcnn-x101-to-faster-rcnn-r50",
                                             "cascade-mask-rcnn-x101-faster-rcnn-r50")])
def test_the_designs_teacher_to_student_spelling_names_the_same_preset(spelling, name):
    assert load_preset(spelling).name == name


def paper_rows(section):
    """The table rows under a bullet of the original README ('Baseline settings', 'Stronger teachers')."""
    lines = PAPER_README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if section in line)
    rows = []
    for line in lines[start + 1:]:
        if line.strip().startswith(("*", "#")):
            break
        if line.strip().startswith("|") and "---" not in line:
            rows.append(line)
    return rows


@pytest.mark.skipif(not PAPER_README.is_file(), reason="the original README is not beside this checkout")
@pytest.mark.parametrize("name", FULL)
def test_reference_maps_are_the_papers(name):
    p = load_preset(name)
    section = "Baseline settings" if p.table == "baseline" else "Stronger teachers"
    wanted = (f"{p.student.name} ({p.student.reference_map:.1f})", f"({p.teacher.reference_map:.1f})",
              f"{p.reference_akd_map:.1f}")
    assert any(all(w in row for w in wanted) for row in paper_rows(section)), \
        f"{name}: no row of the paper's '{section}' table holds {wanted}"


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(PresetError, match="did you mean reppoints-x101-r50"):
        load_preset("reppoints-x101-r5")
    with pytest.raises(PresetError, match="known presets"):
        load_preset("zzzz")


VALID = (REPO / "presets" / f"{TINY}.yaml").read_text()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("method: cwd", "method: kd"), "distill.method: unknown method 'kd'"),
    (lambda t: t.replace("drop_rate: 0.1", "drop_rate: 1.5"), r"avatars.drop_rate: must be in \[0, 1\)"),
    (lambda t: t.replace("num_avatars: 1,", "num_avatars: -2,"), "avatars.num_avatars: must be >= 0"),
    (lambda t: t.replace("uncertainty: release", "uncertainty: variance"), "avatars.uncertainty: unknown mode 'variance'"),
    (lambda t: t.replace("weighting: mean", "weighting: median"), "avatars.weighting: unknown 'median'"),
    (lambda t: t.replace("num_avatars: 1,", "num: 1,"), "avatars.num: unknown field"),
    (lambda t: t.replace("epochs: 12", "epochs: twelve"), "schedule.epochs: expected an integer"),
    (lambda t: t.replace("name: tiny-fcos-r34-r18", "name: other"), "name: must equal the file name"),
    (lambda t: t + "\nlearning_rate: 3\n", "learning_rate: unknown field"),
    (lambda t: t.replace("student_channels: 64", "student_channels: [64, 64]"), "needs one entry per level"),
    (lambda t: t.replace("tiny: true", "tiny: [true"), "not valid YAML"),
])
def test_invalid_presets_name_the_file_and_field(tmp_path, edit, message):
    path = tmp_path / f"{TINY}.yaml"
    path.write_text(edit(VALID))
    with pytest.raises(PresetError, match=message) as info:
        load_preset_file(path)
    assert str(info.value).startswith(f"{TINY}.yaml: ")


def test_preset_error_is_a_user_error():
    assert issubclass(PresetError, UserError)


def _random_batch(n=2, size=128):
    import torch

    img = torch.randn(n, 3, size, size)
    metas = [dict(img_shape=(size, size, 3), ori_shape=(size, size, 3), pad_shape=(size, size, 3),
                  scale_factor=1.0, flip=False, batch_input_shape=(size, size)) for _ in range(n)]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 100.0, 90.0]]) for _ in range(n)]
    labels = [torch.tensor([0, 1]) for _ in range(n)]
    return img, metas, boxes, labels


def _local_token_file(preset, tmp_path):
    """A token file of the preset's shapes, for presets that name MasKD's released (downloaded) one."""
    import torch

    from akd_cli.core.tokens import ReceptiveTokens, token_file_state

    levels = [ReceptiveTokens(c, int(preset.options.get("num_tokens", 6))) for c in preset.features[0].channels]
    path = tmp_path / "tokens.pth"
    torch.save(token_file_state(levels), path)
    return str(path)


@pytest.mark.parametrize("name", sorted(preset_paths()))
def test_every_preset_builds_and_runs_a_training_step(name, tmp_path):
    """Student, teacher and distiller from the generated config, one forward/backward, no weights."""
    import torch

    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from akd_cli.options import TrainOptions
    from mmdet.models import build_detector

    preset = load_preset(name)
    tokens = _local_token_file(preset, tmp_path) if preset.options.get("token_file") else None
    cfg = build_config(preset, TrainOptions(preset=name, token_file=tokens))
    model = build_detector(cfg.model)
    model.train()
    assert not model.teacher.training
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    losses = model.forward_train(*_random_batch())
    loss, log_vars = model._parse_losses(losses)
    akd_keys = [k for k in log_vars if k.startswith("loss_akd_")]
    assert akd_keys == [f"loss_akd_{cfg.model.method}_fpn"]
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(torch.equal(teacher_before[k], v) for k, v in model.teacher.state_dict().items())


@pytest.mark.parametrize("name", sorted(preset_paths()))
def test_every_preset_can_learn_receptive_tokens(name):
    """MasKD's first stage from the generated config: the detector's loss on token-masked features
    trains the tokens alone."""
    import torch

    import akd_cli.mm.token_learning  # noqa: F401
    from akd_cli.mm.config import build_config
    from akd_cli.options import TrainOptions
    from mmdet.models import build_detector

    cfg = build_config(load_preset(name), TrainOptions(preset=name, kind="tokens", iters=3))
    assert cfg.runner == dict(type="AKDIterBasedRunner", max_iters=3)
    model = build_detector(cfg.model)
    model.train()
    assert not any(m.training for m in model.detector.modules() if isinstance(m, torch.nn.BatchNorm2d))
    extra = {}
    if getattr(model.detector, "roi_head", None) is not None and model.detector.roi_head.with_mask:
        from mmdet.core import BitmapMasks

        assert "gt_masks" in cfg.data.train.pipeline[-1]["keys"], "a mask head needs the masks loaded"
        extra["gt_masks"] = [BitmapMasks(np.ones((2, 128, 128), dtype=np.uint8), 128, 128) for _ in range(2)]
    losses = model.forward_train(*_random_batch(), **extra)
    loss, log_vars = model._parse_losses(losses)
    assert torch.isfinite(loss) and 0.0 <= log_vars["loss_token_overlap"] <= len(model.mask_modules)
    loss.backward()
    assert all(p.grad is None for p in model.detector.parameters())
    assert all(p.grad is not None for p in model.mask_modules.parameters())
    # (the weighting heads' gradients may vanish on this untrained detector: equal masks, equal weights)
    assert all(level.mask_token.grad.abs().sum() > 0 for level in model.mask_modules)

"""Feature maps of teacher, Avatars and student for one image, as in the paper's visualisation.

One student: for each distilled level, one PNG: the teacher's feature, each Avatar (titled with
its uncertainty factor gamma), the Avatars' spread (per-position standard deviation across the
Avatars: where they disagree) and the student's feature (after its align conv, i.e. in the
teacher's space). Each panel is the channel-mean of |feature| over the image, with a colour bar;
teacher and Avatars share one scale so they compare directly.

Several students (baseline, base loss, AKD: the paper's figure): for each level one PNG with the
image, the teacher's and each student's heat map side by side (each student's own feature, so a
baseline without align convs compares too; each panel normalised to its own maximum), and under
them every model's detections. Detections are drawn on the image scaled up to at least
``LEGIBLE`` pixels, so boxes and labels stay readable on small images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from akd_cli.errors import UserError


LEGIBLE = 512


@dataclass
class VisualizeRequest:
    preset: str
    checkpoints: List[str]
    image: str
    out: str
    labels: Optional[List[str]] = None
    data_root: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    num_avatars: Optional[int] = None
    levels: Optional[List[int]] = None
    seed: int = 0
    detections: bool = True
    score_thr: float = 0.3


def _prepare_image(cfg, image: str):
    from mmcv.parallel import collate
    from mmdet.datasets import replace_ImageToTensor
    from mmdet.datasets.pipelines import Compose

    pipeline = Compose(replace_ImageToTensor(cfg.data.test.pipeline))
    data = collate([pipeline(dict(img_info=dict(filename=image), img_prefix=None))], samples_per_gpu=1)
    return data["img"][0].data[0], data["img_metas"][0].data[0]


def _heat(feature, meta, size):
    """|feature| averaged over channels, cropped to the un-padded image and resized to the original."""
    import torch.nn.functional as F

    heat = feature.abs().mean(dim=1, keepdim=True)                      # 1 x 1 x h x w
    pad_h, pad_w = meta["pad_shape"][:2]
    img_h, img_w = meta["img_shape"][:2]
    heat = F.interpolate(heat, size=(pad_h, pad_w), mode="bilinear", align_corners=False)[..., :img_h, :img_w]
    return F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def visualize(request: VisualizeRequest) -> List[str]:
    from akd_cli.mm import compat

    compat.apply()
    from akd_cli.plots import pyplot

    plt = pyplot()
    import mmcv
    import torch

    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.core import make_avatar
    from akd_cli.core.uncertainty import AvatarWeigher
    from akd_cli.mm.checkpoints import load_checked, load_state_dict, load_weights, student_state_dict
    from akd_cli.mm.config import build_config
    from akd_cli.options import TrainOptions
    from akd_cli.presets import load_preset
    from mmdet.models import build_detector

    if not Path(request.image).is_file():
        raise UserError(f"image not found: {request.image}")
    original = mmcv.imread(request.image)
    if original is None:
        raise UserError(f"cannot read image: {request.image}")
    preset = load_preset(request.preset)
    teacher_ckpt = request.teacher_checkpoint or preset.teacher.checkpoint
    if not teacher_ckpt:
        raise UserError(f"preset {preset.name} has no teacher checkpoint: pass --teacher-checkpoint")
    if request.labels and len(request.labels) != len(request.checkpoints):
        raise UserError(f"--label: {len(request.labels)} label(s) for {len(request.checkpoints)} checkpoint(s)")
    cfg = build_config(preset, TrainOptions(preset=request.preset, teacher_checkpoint=teacher_ckpt,
                                            data_root=request.data_root))
    model = build_detector(cfg.model)
    if len(request.checkpoints) > 1:
        return _compare(request, cfg, model, teacher_ckpt, original)
    checkpoint = request.checkpoints[0]
    weights = load_state_dict(checkpoint)
    load_checked(model.student, student_state_dict(weights), checkpoint, "student")
    align = {k[len("align."):]: v for k, v in weights.items() if k.startswith("align.")}
    if align:  # a full akd checkpoint holds the trained align convs: the student in the teacher's space
        model.align.load_state_dict(align, strict=False)
    load_weights(model.teacher, teacher_ckpt, "teacher")
    model.eval()
    classes = cfg.data.test.get("classes") or getattr(model.student, "CLASSES", None)
    model.CLASSES = classes
    img, metas = _prepare_image(cfg, request.image)
    num_avatars = preset.num_avatars if request.num_avatars is None else request.num_avatars
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    written: List[str] = []
    with torch.no_grad():
        with model.student_recorder:
            model.student.forward_dummy(img)
        with model.teacher_recorder:
            model.teacher.forward_dummy(img)
        torch.manual_seed(request.seed)
        size = original.shape[:2]
        rgb = mmcv.bgr2rgb(original)
        for spec in model.distill:
            students = model.student_recorder.levels(spec["student"])
            teachers = model.teacher_recorder.levels(spec["teacher"])
            aligned = bool(align) and spec["name"] in model.align
            if aligned:  # only trained align convs: an exported student has none, its own feature is shown
                students = [conv(s) for conv, s in zip(model.align[spec["name"]], students)]
            levels = request.levels if request.levels is not None else list(range(len(teachers)))
            bad = [level for level in levels if not 0 <= level < len(teachers)]
            if bad:
                raise UserError(f"--levels: {spec['name']} has levels 0..{len(teachers) - 1}, got {bad}")
            for level in levels:
                teacher, student = teachers[level], students[level]
                avatars = [make_avatar(teacher, preset.perturbation, preset.drop_rate) for _ in range(num_avatars)]
                weigher = AvatarWeigher(teacher, preset.weighting)
                weights_k = torch.stack([weigher(a) for a in avatars]) if avatars else torch.zeros(0, 1)
                gammas = (weights_k / weights_k.sum(dim=0, keepdim=True))[:, 0].tolist() if avatars else []
                panels = [("teacher", _heat(teacher, metas[0], size))]
                panels += [(f"Avatar {k + 1} (gamma {g:.2f})", _heat(a, metas[0], size))
                           for k, (a, g) in enumerate(zip(avatars, gammas))]
                shared = panels[:]  # teacher and Avatars on one scale
                if len(avatars) > 1:
                    spread = torch.stack([a.abs().mean(dim=1, keepdim=True) for a in avatars]).std(dim=0)
                    panels.append(("Avatar spread", _heat(spread, metas[0], size)))
                panels.append(("student (aligned)" if aligned else "student", _heat(student, metas[0], size)))
                vmax = max(float(p[1].max()) for p in shared) or 1.0
                fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
                for ax, (title, heat) in zip(axes[0], panels):
                    ax.imshow(rgb)
                    scale = dict(vmin=0.0, vmax=vmax) if (title, heat) in [(t, h) for t, h in shared] else {}
                    shown = ax.imshow(heat, cmap="jet", alpha=0.55, **scale)
                    ax.set_title(title, fontsize=9)
                    ax.axis("off")
                    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
                fig.suptitle(f"{preset.name}: {spec['name']} level {level} "
                             f"({teacher.shape[-2]}x{teacher.shape[-1]}, {preset.perturbation} {preset.drop_rate:g}, "
                             f"{preset.uncertainty} factor, {preset.weighting} weighting)", fontsize=10)
                fig.tight_layout()
                path = out / f"{spec['name']}_level{level}.png"
                fig.savefig(path, dpi=100)
                plt.close(fig)
                written.append(str(path))
    if request.detections:
        for role, detector in (("teacher", model.teacher), ("student", model.student)):
            path = out / f"detections_{role}.png"
            _draw_detections(detector, classes, img, metas, original, request.score_thr, path)
            written.append(str(path))
    return written


def _draw_detections(detector, classes, img, metas, original, score_thr: float, path=None):
    """The detector's detections on the image scaled up to at least LEGIBLE pixels (boxes scaled
    with it), so labels are readable; written to ``path`` when given; returns the RGB array."""
    import math

    import mmcv
    import torch

    detector.CLASSES = classes
    with torch.no_grad():
        result = detector.simple_test(img, metas, rescale=True)[0]
    scale = max(1, math.ceil(LEGIBLE / max(original.shape[:2])))
    big = mmcv.imrescale(original, scale, interpolation="nearest") if scale > 1 else original.copy()
    boxes = result[0] if isinstance(result, tuple) else result
    boxes = [b.copy() for b in boxes]
    for b in boxes:
        b[:, :4] *= scale
    drawn = detector.show_result(big, boxes, score_thr=score_thr, show=False, thickness=2, font_size=12,
                                 out_file=str(path) if path else None)
    return mmcv.bgr2rgb(drawn if drawn is not None else mmcv.imread(str(path)))


def _compare(request: VisualizeRequest, cfg, model, teacher_ckpt: str, original) -> List[str]:
    """The paper's figure: teacher and several students, heat maps and detections side by side."""
    import copy

    from akd_cli.plots import pyplot

    plt = pyplot()
    import mmcv
    import torch

    from akd_cli.mm.checkpoints import load_checked, load_state_dict, load_weights, student_state_dict
    from mmdet.models import build_detector

    load_weights(model.teacher, teacher_ckpt, "teacher")
    labels = request.labels or [Path(c).parent.name or Path(c).stem for c in request.checkpoints]
    students = []
    for checkpoint in request.checkpoints:
        student = build_detector(copy.deepcopy(cfg.model.student))
        load_checked(student, student_state_dict(load_state_dict(checkpoint)), checkpoint, "student")
        student.eval()
        students.append(student)
    model.eval()
    classes = cfg.data.test.get("classes") or getattr(model.student, "CLASSES", None)
    img, metas = _prepare_image(cfg, request.image)
    from akd_cli.mm.distiller import AKDDistiller, modules_of
    from akd_cli.mm.recorder import FeatureRecorder

    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    size = original.shape[:2]
    rgb = mmcv.bgr2rgb(original)
    written: List[str] = []
    detections = []
    if request.detections:
        for name, detector in [("teacher", model.teacher)] + list(zip(labels, students)):
            path = out / f"detections_{name}.png"
            detections.append((name, _draw_detections(detector, classes, img, metas, original, request.score_thr, path)))
            written.append(str(path))
    with torch.no_grad():
        with model.teacher_recorder:
            model.teacher.forward_dummy(img)
        for spec in model.distill:
            teachers = AKDDistiller.recorded(model.teacher_recorder, spec, "teacher")
            per_student = []
            for student in students:
                recorder = FeatureRecorder(student, modules_of(spec["student"]), "student")
                with recorder:
                    student.forward_dummy(img)
                per_student.append(AKDDistiller.recorded(recorder, spec, "student"))
            levels = request.levels if request.levels is not None else list(range(len(teachers)))
            bad = [level for level in levels if not 0 <= level < len(teachers)]
            if bad:
                raise UserError(f"--levels: {spec['name']} has levels 0..{len(teachers) - 1}, got {bad}")
            for level in levels:
                heats = [("teacher", _heat(teachers[level], metas[0], size))]
                heats += [(label, _heat(feats[level], metas[0], size)) for label, feats in zip(labels, per_student)]
                columns = 1 + len(heats)
                rows = 2 if detections else 1
                fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.5 * rows), squeeze=False)
                axes[0][0].imshow(rgb)
                axes[0][0].set_title("image", fontsize=10)
                for ax, (title, heat) in zip(axes[0][1:], heats):
                    ax.imshow(rgb)
                    ax.imshow(heat / (heat.max() or 1.0), cmap="jet", alpha=0.55, vmin=0.0, vmax=1.0)
                    ax.set_title(title, fontsize=10)
                if detections:
                    axes[1][0].axis("off")
                    for ax, (title, drawn) in zip(axes[1][1:], detections):
                        ax.imshow(drawn)
                        ax.set_title(f"{title}: detections", fontsize=10)
                for ax in axes.flat:
                    ax.set_xticks([])
                    ax.set_yticks([])
                fig.suptitle(f"{cfg.akd.get('preset', '')}: {spec['name']} level {level} "
                             f"({teachers[level].shape[-2]}x{teachers[level].shape[-1]}); heat: channel-mean |feature|, "
                             "each panel to its own maximum", fontsize=10)
                fig.tight_layout()
                path = out / f"compare_{spec['name']}_level{level}.png"
                fig.savefig(path, dpi=110)
                plt.close(fig)
                written.append(str(path))
    return written

"""Presets to complete, standalone mmdet configs.

The generated file holds everything (no ``_base_``): the distiller model, the student's data
pipeline and schedule, and ``custom_imports`` of akd's registrations, so mmdet's own
``tools/train.py`` can run it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from akd_cli.errors import UserError
from akd_cli.presets import ModelSpec, Preset

MMDET_SCHEME = "mmdet://"
COCO_ROOT_IN_MMDET_CONFIGS = "data/coco/"
ROLES = ("student", "teacher", "tokens")
MASKD_TOKEN_ITERS = 2000
SYNTH_CLASSES = ("disc", "box", "triangle", "ring", "cross", "star", "diamond", "hexagon", "crescent", "bar")


def mmdet_config_dir() -> Path:
    import mmdet

    return Path(mmdet.__file__).resolve().parent / ".mim" / "configs"


def resolve_config_path(reference: str) -> Path:
    if reference.startswith(MMDET_SCHEME):
        path = mmdet_config_dir() / reference[len(MMDET_SCHEME):]
    else:
        path = Path(reference).expanduser()
    if not path.is_file():
        raise UserError(f"config not found: {reference} ({path})")
    return path


def _model_dict(spec: ModelSpec) -> Dict[str, Any]:
    if spec.model is not None:
        return copy.deepcopy(spec.model)
    from mmcv import Config

    return Config.fromfile(str(resolve_config_path(spec.config)))._cfg_dict.to_dict()["model"]


def retarget_paths(node, old_prefix: str, new_root: str):
    """Every string of a config tree that starts with ``old_prefix``, moved under ``new_root``."""
    if isinstance(node, dict):
        return {k: retarget_paths(v, old_prefix, new_root) for k, v in node.items()}
    if isinstance(node, list):
        return [retarget_paths(v, old_prefix, new_root) for v in node]
    if isinstance(node, str) and old_prefix and node.startswith(old_prefix):
        return new_root.rstrip("/") + "/" + node[len(old_prefix):].lstrip("/")
    return node


def synth_training_config(data: Dict[str, Any], data_root: str, epochs: int) -> Dict[str, Any]:
    """Data pipeline and schedule for the synthetic shapes dataset (tiny presets)."""
    size = int(data.get("image_size", 128))
    num_classes = int(data.get("num_classes", 6))
    classes = SYNTH_CLASSES[:num_classes]
    norm = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
    train_pipeline = [
        dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", img_scale=(size, size), keep_ratio=True),
        dict(type="RandomFlip", flip_ratio=0.5), dict(type="Normalize", **norm),
        dict(type="Pad", size_divisor=32), dict(type="DefaultFormatBundle"),
        dict(type="Collect", keys=["img", "gt_bboxes", "gt_labels"]),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="MultiScaleFlipAug", img_scale=(size, size), flip=False, transforms=[
            dict(type="Resize", keep_ratio=True), dict(type="RandomFlip"), dict(type="Normalize", **norm),
            dict(type="Pad", size_divisor=32), dict(type="ImageToTensor", keys=["img"]),
            dict(type="Collect", keys=["img"])]),
    ]
    root = data_root.rstrip("/") + "/"

    def split(name, pipeline):
        return dict(type="CocoDataset", classes=classes, ann_file=f"{root}annotations/instances_{name}.json",
                    img_prefix=f"{root}{name}/", pipeline=pipeline)

    lr = float(data.get("lr", 0.01))
    return dict(
        dataset_type="CocoDataset", data_root=root,
        data=dict(samples_per_gpu=int(data.get("samples_per_gpu", 8)), workers_per_gpu=int(data.get("workers_per_gpu", 0)),
                  train=split("train", train_pipeline), val=split("val", test_pipeline),
                  test=split("val", test_pipeline)),
        evaluation=dict(interval=epochs, metric="bbox"),
        optimizer=dict(type="SGD", lr=lr, momentum=0.9, weight_decay=1e-4),
        optimizer_config=dict(grad_clip=dict(max_norm=35, norm_type=2)),
        lr_config=dict(policy="step", warmup="linear", warmup_iters=int(data.get("warmup_iters", 50)),
                       warmup_ratio=0.1, step=[max(1, round(epochs * 8 / 12)), max(1, round(epochs * 11 / 12))]),
        checkpoint_config=dict(interval=1, max_keep_ckpts=2),
        log_config=dict(interval=int(data.get("log_interval", 10)), hooks=[dict(type="TextLoggerHook")]),
        dist_params=dict(backend="nccl"), log_level="INFO", load_from=None, resume_from=None,
        workflow=[("train", 1)], opencv_num_threads=0, mp_start_method="fork",
        auto_scale_lr=dict(enable=False, base_batch_size=16),
    )


def build_config(preset: Preset, *, data_root: Optional[str] = None, teacher_checkpoint: Optional[str] = None,
                 method: Optional[str] = None, num_avatars: Optional[int] = None, drop_rate: Optional[float] = None,
                 uncertainty: Optional[str] = None, epochs: Optional[int] = None, batch_size: Optional[int] = None,
                 cfg_options: Optional[Dict[str, Any]] = None, role: str = "student",
                 token_file: Optional[str] = None, iters: Optional[int] = None):
    """The mmcv Config of a preset, with the command line's overrides applied.

    ``method="none"`` gives the student baseline: the distiller without a teacher.
    ``role="teacher"`` trains the preset's teacher model alone (how the tiny presets get a teacher).
    ``role="tokens"`` learns MasKD's receptive tokens on the teacher (``iters`` iterations);
    ``token_file`` gives the distillation such learnt tokens.
    """
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    from mmcv import Config

    epochs = epochs or preset.epochs
    method = method or preset.method
    if preset.tiny:
        root = data_root or preset.data.get("root", "data/synth")
        base: Dict[str, Any] = synth_training_config(preset.data, root, epochs)
        student, teacher = _model_dict(preset.student), _model_dict(preset.teacher)
    else:
        student_cfg = Config.fromfile(str(resolve_config_path(preset.student.config)))
        base = student_cfg._cfg_dict.to_dict()
        student, teacher = base.pop("model"), _model_dict(preset.teacher)
        if data_root:
            base["data"] = retarget_paths(base["data"], COCO_ROOT_IN_MMDET_CONFIGS, data_root)
            base["data_root"] = data_root.rstrip("/") + "/"
        base["lr_config"] = dict(base.get("lr_config", {}))
        if base["lr_config"].get("policy") == "step":
            base["lr_config"]["step"] = [max(1, round(epochs * 8 / 12)), max(1, round(epochs * 11 / 12))]
        base["evaluation"] = dict(base.get("evaluation", {}), interval=epochs)
        base["checkpoint_config"] = dict(base.get("checkpoint_config", {}), interval=1, max_keep_ckpts=3)
    base.pop("model", None)
    if role == "tokens":
        return _token_learning_config(preset, base, teacher, teacher_checkpoint, iters, batch_size, cfg_options)
    if role == "teacher":
        student, method = teacher, "none"
    distilled = method != "none"
    if token_file and method != "maskd":
        raise UserError(f"receptive tokens are for the MasKD base loss; this run distils with {method}")
    model = dict(type="AKDDistiller", student=student)
    if distilled:
        model.update(
            teacher=teacher, teacher_checkpoint=teacher_checkpoint or preset.teacher.checkpoint, method=method,
            options=dict(dict(preset.options) if method == preset.method else {},
                         **({"token_file": token_file} if token_file else {})),
            distill=[dict(name=f.name, student=f.student, teacher=f.teacher, channels=list(f.channels),
                          **({"student_channels": list(f.student_channels)} if f.student_channels else {}))
                     for f in preset.features],
            avatars=dict(num_avatars=preset.num_avatars if num_avatars is None else num_avatars,
                         drop_rate=preset.drop_rate if drop_rate is None else drop_rate,
                         uncertainty=uncertainty or preset.uncertainty, perturbation=preset.perturbation))
    cfg = dict(base)
    cfg["model"] = model
    cfg["optimizer"] = dict(cfg["optimizer"], constructor="AKDOptimizerConstructor")
    cfg["runner"] = dict(type="AKDEpochBasedRunner", max_epochs=epochs)
    cfg.pop("total_epochs", None)
    if batch_size:
        cfg["data"] = dict(cfg["data"], samples_per_gpu=batch_size)
    _add_akd_hooks_and_imports(cfg)
    cfg["akd"] = dict(preset=preset.name, method=method if distilled else "none",
                      role="teacher" if role == "teacher" else ("distilled" if distilled else "baseline"),
                      dataset="synth" if preset.tiny else "coco")
    config = Config(cfg)
    if cfg_options:
        config.merge_from_dict(cfg_options)
    return config


def _add_akd_hooks_and_imports(cfg: Dict[str, Any]) -> None:
    hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") != "RichProgressHook"]
    cfg["custom_hooks"] = hooks + [dict(type="RichProgressHook", priority="VERY_LOW")]
    cfg["custom_imports"] = dict(imports=["akd_cli.mm.distiller", "akd_cli.mm.token_learning"],
                                 allow_failed_imports=False)


def _loading_masks(dataset: Dict[str, Any]) -> Dict[str, Any]:
    """A training dataset config whose pipeline also loads and collects the instance masks."""
    dataset = copy.deepcopy(dataset)
    inner = dataset["dataset"] if "pipeline" not in dataset and "dataset" in dataset else dataset
    for step in inner["pipeline"]:
        if step["type"] == "LoadAnnotations":
            step["with_mask"] = True
        if step["type"] == "Collect" and "gt_masks" not in step["keys"]:
            step["keys"] = list(step["keys"]) + ["gt_masks"]
    return dataset


def _token_learning_config(preset: Preset, base: Dict[str, Any], teacher: Dict[str, Any],
                           teacher_checkpoint: Optional[str], iters: Optional[int], batch_size: Optional[int],
                           cfg_options: Optional[Dict[str, Any]]):
    """MasKD's token-learning stage: its published schedule (Adam, lr 0.01, weight decay 1e-3,
    cosine to 1e-6, 2000 iterations at 16 images per step), on the preset's data."""
    from mmcv import Config

    if len(preset.features) != 1:
        raise UserError(f"preset {preset.name} distils {len(preset.features)} features; token learning "
                        "masks one module's outputs (MasKD: the FPN neck)")
    feature = preset.features[0]
    options = dict(preset.options) if preset.method == "maskd" else {}
    iters = iters or MASKD_TOKEN_ITERS
    cfg = dict(base)
    if (teacher.get("roi_head") or {}).get("mask_head"):
        # The teacher's training loss includes its mask head (Cascade Mask R-CNN): load the masks.
        cfg["data"] = dict(cfg["data"], train=_loading_masks(cfg["data"]["train"]))
    cfg["model"] = dict(type="ReceptiveTokenLearner", detector=teacher,
                        checkpoint=teacher_checkpoint or preset.teacher.checkpoint, module=feature.teacher,
                        channels=list(feature.channels), num_tokens=int(options.get("num_tokens", 6)),
                        weight_tokens=bool(options.get("weight_tokens", True)))
    cfg["optimizer"] = dict(type="Adam", lr=0.01, weight_decay=0.001)
    cfg["optimizer_config"] = dict(grad_clip=None)
    cfg["lr_config"] = dict(policy="CosineAnnealing", min_lr=1e-6, by_epoch=False)
    cfg["runner"] = dict(type="AKDIterBasedRunner", max_iters=iters)
    cfg["checkpoint_config"] = dict(by_epoch=False, interval=iters, max_keep_ckpts=1)
    cfg["log_config"] = dict(interval=min(50, iters), hooks=[dict(type="TextLoggerHook", by_epoch=False)])
    cfg["workflow"] = [("train", 1)]
    cfg.pop("evaluation", None)
    cfg.pop("total_epochs", None)
    cfg.update(load_from=None, resume_from=None)
    if batch_size:
        cfg["data"] = dict(cfg["data"], samples_per_gpu=batch_size)
    _add_akd_hooks_and_imports(cfg)
    cfg["akd"] = dict(preset=preset.name, method="maskd", role="tokens", dataset="synth" if preset.tiny else "coco")
    config = Config(cfg)
    if cfg_options:
        config.merge_from_dict(cfg_options)
    return config


def student_config(config):
    """The plain mmdet config of the student alone: runs in mmdet's own tools without akd."""
    from mmcv import Config

    cfg = copy.deepcopy(config._cfg_dict.to_dict())
    cfg["model"] = cfg["model"]["student"]
    cfg["optimizer"] = {k: v for k, v in cfg["optimizer"].items() if k != "constructor"}
    cfg["runner"] = dict(type="EpochBasedRunner", max_epochs=cfg["runner"]["max_epochs"])
    cfg["custom_hooks"] = [h for h in cfg.get("custom_hooks", []) if h.get("type") != "RichProgressHook"]
    cfg.pop("custom_imports", None)
    cfg.pop("akd", None)
    return Config(cfg)


def dump_config(config, path: Path) -> Path:
    """Write a config file atomically."""
    from akd_cli import fileio

    return fileio.write_text(path, config.pretty_text)


def parse_cfg_options(items: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` pairs as mmcv's DictAction parses them (values are Python literals when they can be)."""
    import ast

    options: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--cfg-options takes key=value pairs, got {item!r}")
        key, value = item.split("=", 1)
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options

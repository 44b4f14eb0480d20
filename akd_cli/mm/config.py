"""Presets to complete, standalone mmdet configs.

The generated file holds everything (no ``_base_``): the distiller model, the student's data
pipeline and schedule, and ``custom_imports`` of akd's registrations, so mmdet's own
``tools/train.py`` can run it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from akd_cli.errors import UserError
from akd_cli.options import TrainOptions
from akd_cli.presets import OPTIMIZER_PARTS, ModelSpec, Preset

MMDET_SCHEME = "mmdet://"
COCO_ROOT_IN_MMDET_CONFIGS = "data/coco/"
# The modules whose import registers akd's models, runners and hooks with mmdet and mmcv: generated
# configs import them (``custom_imports``), so mmdet's own tools run those configs too.
REGISTERING_MODULES = ("akd_cli.mm.distiller", "akd_cli.mm.runners", "akd_cli.mm.hooks", "akd_cli.mm.token_learning")
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
        model = copy.deepcopy(spec.model)
    else:
        from mmcv import Config

        model = Config.fromfile(str(resolve_config_path(spec.config)))._cfg_dict.to_dict()["model"]
    for key, value in spec.overrides.items():
        set_dotted(model, key, value)
    return model


def set_dotted(tree: Dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b][c] = value for key 'a.b.c' (list items by index), creating mappings on the way."""
    parts = key.split(".")
    node: Any = tree
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def retarget_paths(node, old_prefix: str, new_root: str):
    """Every string of a config tree that starts with ``old_prefix``, moved under ``new_root``."""
    if isinstance(node, dict):
        return {k: retarget_paths(v, old_prefix, new_root) for k, v in node.items()}
    if isinstance(node, list):
        return [retarget_paths(v, old_prefix, new_root) for v in node]
    if isinstance(node, str) and old_prefix and node.startswith(old_prefix):
        return new_root.rstrip("/") + "/" + node[len(old_prefix):].lstrip("/")
    return node


def lr_steps(epochs: int) -> list:
    """The step schedule's decay epochs for a run of ``epochs``: mmdet's 1x/2x proportions (8 and 11
    of 12), the one formula of every akd config."""
    return [max(1, round(epochs * 8 / 12)), max(1, round(epochs * 11 / 12))]


def retarget_data_root(cfg: Dict[str, Any], new_root: str) -> Dict[str, Any]:
    """The config with every data path under its ``data_root`` (mmdet's COCO default when it names
    none) moved under ``new_root``."""
    cfg = dict(cfg)
    old = cfg.get("data_root") or COCO_ROOT_IN_MMDET_CONFIGS
    cfg["data"] = retarget_paths(cfg["data"], old, new_root)
    cfg["data_root"] = new_root.rstrip("/") + "/"
    return cfg


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
                       warmup_ratio=0.1, step=lr_steps(epochs)),
        checkpoint_config=dict(interval=1, max_keep_ckpts=2),
        log_config=dict(interval=int(data.get("log_interval", 10)), hooks=[dict(type="TextLoggerHook")]),
        dist_params=dict(backend="nccl"), log_level="INFO", load_from=None, resume_from=None,
        workflow=[("train", 1)], opencv_num_threads=0, mp_start_method="fork",
        auto_scale_lr=dict(enable=False, base_batch_size=16),
    )


@dataclass
class RunConfigs:
    """What a run executes (``run``) and, for a distillation or a baseline, the student's plain
    mmdet config (``student``: the student alone, runnable in mmdet's tools without akd);
    ``notes``: what the user should hear about how the options were resolved."""
    run: Any
    student: Optional[Any] = None
    notes: list = field(default_factory=list)


def plain_config(preset: Preset, options: TrainOptions, model: Dict[str, Any]) -> Dict[str, Any]:
    """Step 1: a plain mmdet config of one detector on the preset's data and schedule (the student's
    recipe), with the options' epochs, batch size and data root."""
    epochs = options.epochs or preset.epochs
    if preset.tiny:
        cfg = synth_training_config(preset.data, preset.data.get("root", "data/synth"), epochs)
    else:
        from mmcv import Config

        cfg = Config.fromfile(str(resolve_config_path(preset.student.config)))._cfg_dict.to_dict()
        cfg["lr_config"] = dict(cfg.get("lr_config", {}))
        if cfg["lr_config"].get("policy") == "step":
            cfg["lr_config"]["step"] = lr_steps(epochs)
        cfg["evaluation"] = dict(cfg.get("evaluation", {}), interval=epochs)
        cfg["checkpoint_config"] = dict(cfg.get("checkpoint_config", {}), interval=1, max_keep_ckpts=3)
    _apply_schedule(cfg, preset.schedule)
    if options.data_root:
        cfg = retarget_data_root(cfg, options.data_root)
    if options.batch_size:
        cfg["data"] = dict(cfg["data"], samples_per_gpu=options.batch_size)
    cfg.pop("total_epochs", None)
    cfg["model"] = model
    cfg["runner"] = dict(type="EpochBasedRunner", max_epochs=epochs)
    return cfg


def _apply_schedule(cfg: Dict[str, Any], schedule) -> None:
    """The recipe's optimiser settings over the student config's (only those the preset names)."""
    optimizer = dict(cfg["optimizer"])
    if schedule.lr is not None:
        optimizer["lr"] = schedule.lr
    paramwise = dict(optimizer.get("paramwise_cfg") or {})
    for key in ("bias_lr_mult", "bias_decay_mult"):
        if getattr(schedule, key) is not None:
            paramwise[key] = getattr(schedule, key)
    if paramwise:
        optimizer["paramwise_cfg"] = paramwise
    cfg["optimizer"] = optimizer
    lr_config = dict(cfg.get("lr_config") or {})
    for key in ("warmup", "warmup_iters", "warmup_ratio"):
        if getattr(schedule, key) is not None:
            lr_config[key] = getattr(schedule, key)
    cfg["lr_config"] = lr_config
    if schedule.grad_clip is not None:
        cfg["optimizer_config"] = dict(grad_clip=dict(max_norm=schedule.grad_clip, norm_type=2))
    elif schedule.no_grad_clip:
        cfg["optimizer_config"] = dict(grad_clip=None)


def build_configs(preset: Preset, options: TrainOptions) -> RunConfigs:
    """The configs of a preset run with the command line's options, built in steps: the plain
    config of the trained detector, then (for a student) the distiller wrapped around it, then akd's
    runner, hooks and imports, then ``--cfg-options``.

    ``options.kind``: ``student`` (distilled, or the baseline with ``method="none"``), ``teacher``
    (the preset's teacher trained alone: how the tiny presets get a teacher) or ``tokens`` (MasKD's
    receptive tokens learnt on the teacher).
    """
    from mmcv import Config

    if options.kind == "tokens":
        plain = plain_config(preset, options, _model_dict(preset.teacher))
        return RunConfigs(_token_learning_config(preset, plain, options))
    trained = preset.teacher if options.kind == "teacher" else preset.student
    plain = plain_config(preset, options, _model_dict(trained))
    method = "none" if options.kind == "teacher" else (options.method or preset.method)
    if options.token_file and method != "maskd":
        raise UserError(f"receptive tokens are for the MasKD base loss; this run distils with {method}")
    notes: list = []
    setting = None
    if method not in ("none", preset.method):
        from akd_cli.presets import method_setting

        setting = method_setting(method, preset.family)
        notes.append(f"{method} with its own settings for {preset.family} detectors ({setting.source})" if setting
                     else f"{method}: its authors published no {preset.family or 'such'} setting; "
                          "the loss's own defaults are used")
        if setting and setting.grad_clip:
            plain["optimizer_config"] = dict(grad_clip=dict(max_norm=setting.grad_clip, norm_type=2))
    cfg = copy.deepcopy(plain)
    cfg["model"] = _distiller(preset, options, plain["model"], method, setting)
    cfg["optimizer"] = dict(cfg["optimizer"], constructor="AKDOptimizerConstructor")
    fixed = [OPTIMIZER_PARTS[part] for part in preset.optimizer_fixed] if method == preset.method else []
    if fixed:  # the recipe's optimiser leaves these distiller modules as they are (lr_mult 0)
        paramwise = dict(cfg["optimizer"].get("paramwise_cfg") or {})
        paramwise["custom_keys"] = dict(paramwise.get("custom_keys") or {},
                                        **{part: dict(lr_mult=0.0, decay_mult=0.0) for part in fixed})
        cfg["optimizer"]["paramwise_cfg"] = paramwise
    cfg["runner"] = dict(cfg["runner"], type="AKDEpochBasedRunner")
    cfg["akd"] = dict(preset=preset.name, method=method,
                      role="teacher" if options.kind == "teacher" else ("baseline" if method == "none" else "distilled"),
                      dataset="synth" if preset.tiny else "coco")
    student = Config(plain)
    if options.cfg_options:
        student.merge_from_dict(_student_side(options.cfg_options))
    return RunConfigs(_with_akd_runtime(cfg, options), student, notes)


def _student_side(cfg_options: Dict[str, Any]) -> Dict[str, Any]:
    """The ``--cfg-options`` that concern the student's plain config: everything outside the model,
    and ``model.student.*`` as ``model.*`` (the teacher's and the distiller's keys are not its own)."""
    own = {}
    for key, value in cfg_options.items():
        if key.startswith("model.student."):
            own["model." + key[len("model.student."):]] = value
        elif not key.startswith(("model.", "custom_imports", "custom_hooks", "akd.", "optimizer.constructor")):
            own[key] = value
    return own


def build_config(preset: Preset, options: TrainOptions):
    """The config a preset run executes (see ``build_configs``)."""
    return build_configs(preset, options).run


def _features(preset: Preset, setting) -> list:
    """The distilled features: the preset's, or what a method's own config distils instead."""
    specs = []
    for f in preset.features:
        spec = dict(name=f.name, student=f.student, teacher=f.teacher, channels=list(f.channels),
                    **({"student_channels": list(f.student_channels)} if f.student_channels else {}),
                    **({"align": True} if f.align and setting is None else {}),
                    **({"levels": list(f.levels)} if f.levels else {}))
        if setting is not None and setting.module and f is preset.features[0]:
            levels = list(setting.levels or range(len(f.channels)))
            spec["channels"] = [f.channels[i] for i in levels]
            if f.student_channels:
                spec["student_channels"] = [f.student_channels[i] for i in levels]
            if "{i}" in setting.module:  # one module per level
                spec["student"] = spec["teacher"] = [setting.module.format(i=i) for i in levels]
            else:
                spec["student"] = spec["teacher"] = setting.module
                spec["levels"] = levels
        specs.append(spec)
    return specs


def _distiller(preset: Preset, options: TrainOptions, student: Dict[str, Any], method: str,
               setting=None) -> Dict[str, Any]:
    """Step 2: the distiller around the student (without a teacher for the baseline). A method other
    than the preset's comes with its own settings for the preset's family (``setting``), not the
    row's head terms, inherited and fixed modules."""
    model = dict(type="AKDDistiller", student=student)
    if method == "none":
        return model
    own = method == preset.method
    model.update(
        teacher=_model_dict(preset.teacher),
        teacher_checkpoint=options.teacher_checkpoint or preset.teacher.checkpoint, method=method,
        options=dict(dict(preset.options) if own else dict(setting.options) if setting else {},
                     **({"token_file": options.token_file} if options.token_file else {})),
        distill=_features(preset, setting),
        heads=[dict(name=h.name, student=h.student, teacher=h.teacher, loss=h.loss, weight=h.weight,
                    options=dict(h.options),
                    **({"student_inputs": dict(student=h.student_inputs.student, teacher=h.student_inputs.teacher,
                                               indices=list(h.student_inputs.indices))} if h.student_inputs else {}))
               for h in preset.heads] if method == preset.method else [],
        init_from_teacher=list(preset.init_from_teacher if own else setting.init_from_teacher if setting else []),
        origin=_origin(preset),
        avatars=dict(num_avatars=_given(options.num_avatars, preset.num_avatars),
                     drop_rate=_given(options.drop_rate, preset.drop_rate),
                     uncertainty=options.uncertainty or preset.uncertainty,
                     weighting=options.weighting or preset.weighting,
                     perturbation=options.perturbation or preset.perturbation,
                     sigma_momentum=preset.sigma_momentum))
    return model


def _origin(preset: Preset) -> str:
    """The preset file, as errors about its fields name it."""
    from akd_cli.presets import PRESET_DIR

    if preset.path is None:
        return preset.name
    return f"presets/{preset.path.name}" if preset.path.parent.resolve() == PRESET_DIR.resolve() else str(preset.path)


def _given(value, default):
    return default if value is None else value


def _with_akd_runtime(cfg: Dict[str, Any], options: TrainOptions):
    """Step 3: akd's progress hook and registrations, then the user's ``--cfg-options``."""
    from mmcv import Config

    hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") != "RichProgressHook"]
    cfg["custom_hooks"] = hooks + [dict(type="RichProgressHook", priority="VERY_LOW")]
    cfg["custom_imports"] = dict(imports=list(REGISTERING_MODULES), allow_failed_imports=False)
    config = Config(cfg)
    if options.cfg_options:
        config.merge_from_dict(options.cfg_options)
    return config


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


def _token_learning_config(preset: Preset, plain: Dict[str, Any], options: TrainOptions):
    """MasKD's token-learning stage on the teacher: its published schedule (Adam, lr 0.01, weight
    decay 1e-3, cosine to 1e-6, 2000 iterations at 16 images per step), on the preset's data."""
    if len(preset.features) != 1:
        raise UserError(f"preset {preset.name} distils {len(preset.features)} features; token learning "
                        "masks one module's outputs (MasKD: the FPN neck)")
    feature = preset.features[0]
    maskd = dict(preset.options) if preset.method == "maskd" else {}
    iters = options.iters or MASKD_TOKEN_ITERS
    cfg = dict(plain)
    teacher = cfg.pop("model")
    if (teacher.get("roi_head") or {}).get("mask_head"):
        # The teacher's training loss includes its mask head (Cascade Mask R-CNN): load the masks.
        cfg["data"] = dict(cfg["data"], train=_loading_masks(cfg["data"]["train"]))
    cfg["model"] = dict(type="ReceptiveTokenLearner", detector=teacher,
                        checkpoint=options.teacher_checkpoint or preset.teacher.checkpoint, module=feature.teacher,
                        channels=list(feature.channels), num_tokens=int(maskd.get("num_tokens", 6)),
                        weight_tokens=bool(maskd.get("weight_tokens", True)))
    cfg["optimizer"] = dict(type="Adam", lr=0.01, weight_decay=0.001)
    cfg["optimizer_config"] = dict(grad_clip=None)
    cfg["lr_config"] = dict(policy="CosineAnnealing", min_lr=1e-6, by_epoch=False)
    cfg["runner"] = dict(type="AKDIterBasedRunner", max_iters=iters)
    cfg["checkpoint_config"] = dict(by_epoch=False, interval=iters, max_keep_ckpts=1)
    cfg["log_config"] = dict(interval=min(50, iters), hooks=[dict(type="TextLoggerHook", by_epoch=False)])
    cfg["workflow"] = [("train", 1)]
    cfg.pop("evaluation", None)
    cfg.update(load_from=None, resume_from=None)
    cfg["akd"] = dict(preset=preset.name, method="maskd", role="tokens", dataset="synth" if preset.tiny else "coco")
    return _with_akd_runtime(cfg, options)


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

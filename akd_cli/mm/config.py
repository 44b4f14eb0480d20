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
from akd_cli.mm.data import size_heads, use_dataset
from akd_cli.names import AVATAR_OPTIONS
from akd_cli.options import TrainOptions
from akd_cli.presets import OPTIMIZER_PARTS, ModelSpec, Preset

MMDET_SCHEME = "mmdet://"
COCO_ROOT = "data/coco"  # where mmdet's COCO configs expect the data
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


def lr_steps(epochs: int) -> list:
    """The step schedule's decay epochs for a run of ``epochs``: mmdet's 1x/2x proportions (8 and 11
    of 12), the one formula of every akd config."""
    return [max(1, round(epochs * 8 / 12)), max(1, round(epochs * 11 / 12))]


def synth_training_config(data: Dict[str, Any], data_root: str, epochs: int) -> Dict[str, Any]:
    """Data pipeline and schedule of the tiny presets (akd's synthetic layout under ``data_root``,
    its shapes as classes; ``use_dataset`` repoints both at the dataset the root actually holds)."""
    size = int(data.get("image_size", 128))
    classes = SYNTH_CLASSES[:int(data.get("num_classes", 6))]
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


def default_data_root(preset: Preset) -> str:
    return preset.data.get("root", "data/synth") if preset.tiny else COCO_ROOT


def resolve_dataset(preset: Preset, options: TrainOptions):
    """The dataset a run trains on: ``--data-root``, else the preset's default root when it holds
    one (None when it does not yet: the data check says how to get it)."""
    from akd_cli.mm.data import open_dataset

    return open_dataset(options.data_root or default_data_root(preset), required=bool(options.data_root),
                        synthetic=preset.tiny)


def plain_config(preset: Preset, options: TrainOptions, model: Dict[str, Any], dataset=None) -> Dict[str, Any]:
    """Step 1: a plain mmdet config of one detector on the preset's schedule (the student's recipe)
    and the dataset's splits and categories (heads sized to them), with the options' epochs and
    batch size."""
    epochs = options.epochs or preset.epochs
    if preset.tiny:
        cfg = synth_training_config(preset.data, default_data_root(preset), epochs)
    else:
        from mmcv import Config

        cfg = Config.fromfile(str(resolve_config_path(preset.student.config)))._cfg_dict.to_dict()
        cfg["checkpoint_config"] = dict(cfg.get("checkpoint_config", {}), interval=1, max_keep_ckpts=3)
    _apply_schedule(cfg, preset.schedule)
    if dataset is not None:
        use_dataset(cfg, dataset)
        size_heads(model, len(dataset.categories))
    if options.batch_size:
        cfg["data"] = dict(cfg["data"], samples_per_gpu=options.batch_size)
    cfg.pop("total_epochs", None)
    cfg["model"] = model
    cfg["runner"] = dict(type="EpochBasedRunner", max_epochs=epochs)
    set_epochs(cfg, epochs)  # the step schedule and the evaluation at the end, as --config and --resume do
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

    dataset = resolve_dataset(preset, options)
    notes: list = [dataset.describe()] if dataset else []
    if options.kind == "tokens":
        plain = plain_config(preset, options, _model_dict(preset.teacher), dataset)
        return RunConfigs(_token_learning_config(preset, plain, options), notes=notes)
    trained = preset.teacher if options.kind == "teacher" else preset.student
    plain = plain_config(preset, options, _model_dict(trained), dataset)
    method = "none" if options.kind == "teacher" else (options.method or preset.method)
    if options.token_file and method != "maskd":
        raise UserError(f"receptive tokens are for the MasKD base loss; this run distils with {method}")
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
    cfg["model"] = _distiller(preset, options, plain["model"], method, setting, dataset)
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
    run = _with_akd_runtime(cfg, options)  # checks the --cfg-options keys against the whole run's config
    student = Config(plain)
    if options.cfg_options:
        student.merge_from_dict(_student_side(options.cfg_options))
    return RunConfigs(run, student, notes)


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
               setting=None, dataset=None) -> Dict[str, Any]:
    """Step 2: the distiller around the student (without a teacher for the baseline). A method other
    than the preset's comes with its own settings for the preset's family (``setting``), not the
    row's head terms, inherited and fixed modules."""
    model = dict(type="AKDDistiller", student=student)
    if method == "none":
        return model
    own = method == preset.method
    teacher = _model_dict(preset.teacher)
    if dataset is not None:
        size_heads(teacher, len(dataset.categories))
    model.update(
        teacher=teacher,
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
                     sigma_momentum=preset.sigma_momentum,
                     # not a recipe field: written only when given, so a preset's config stays its recipe
                     **({"avatar_kernel": options.avatar_kernel} if options.avatar_kernel else {})))
    check_avatar_kernel(model)
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
    add_loggers(cfg, options.loggers)
    config = Config(cfg)
    merge_cfg_options(config, options.cfg_options)
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


def read_config(path) -> Any:
    """An mmcv Config from a file the user gave or edited: its syntax errors and missing bases are
    input errors, said in one line."""
    from mmcv import Config

    try:
        return Config.fromfile(str(path))
    except Exception as exc:  # noqa: BLE001 (mmcv raises whatever the file's Python raises)
        raise UserError(f"cannot read config {path}: {' '.join(str(exc).split())[:200]}") from None


def dump_config(config, path: Path) -> Path:
    """Write a config file atomically."""
    from akd_cli import fileio

    return fileio.write_text(path, config.pretty_text)


def parse_cfg_options(items: Sequence[str]) -> Dict[str, Any]:
    """``key=value`` pairs as mmcv's DictAction parses them (values are Python literals when they can be)."""
    import ast

    options: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or value.startswith("="):
            raise UserError(f"--cfg-options takes key=value pairs (one '=' between them), got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key.strip()] = value
    return options


def check_cfg_keys(tree: Dict[str, Any], cfg_options: Dict[str, Any]) -> None:
    """Every ``--cfg-options`` key names a key the config has (a list item by its index): a typo
    would otherwise add a key nothing reads. Refused with the closest keys at the level it fails."""
    import difflib

    for key in cfg_options:
        node: Any = tree
        parts = key.split(".")
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth])
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if isinstance(node, dict) and part in node:
                node = node[part]
                continue
            if isinstance(node, dict):
                close = difflib.get_close_matches(part, [str(k) for k in node], n=3, cutoff=0.5)
                where = f"{here}." if here else ""
                hint = (f"; did you mean {' or '.join(where + c for c in close)}?" if close
                        else f"; {here or 'the config'} has {', '.join(sorted(map(str, node))[:12])}")
            elif isinstance(node, list):
                hint = f"; {here} is a list of {len(node)} (index it 0..{len(node) - 1})"
            else:
                hint = f"; {here} is {node!r}, not a mapping (set {here}=... whole)"
            raise UserError(f"--cfg-options {key}: the config has no such key{hint}")


def merge_cfg_options(config, cfg_options: Dict[str, Any]) -> None:
    """``--cfg-options`` into an mmcv Config, each key checked first."""
    if cfg_options:
        check_cfg_keys(config._cfg_dict.to_dict(), cfg_options)
        config.merge_from_dict(cfg_options)


# The options that shape what a run trains; a resumed run keeps what it started with.
SHAPING_OPTIONS = {"method": "--method", "num_avatars": "--num-avatars", "drop_rate": "--drop-rate",
                   "uncertainty": "--uncertainty", "weighting": "--weighting", "perturbation": "--perturbation",
                   "avatar_kernel": "--avatar-kernel",
                   "teacher_checkpoint": "--teacher-checkpoint", "token_file": "--token-file",
                   "data_root": "--data-root", "batch_size": "--batch-size"}


def check_avatar_kernel(model: Dict[str, Any]) -> None:
    """The compiled Avatar passes serve dropout Avatars of the fusable base losses: other settings
    are refused before anything runs (AKDLoss would refuse them in every worker)."""
    from akd_cli.core.fused import unserved

    avatars = model.get("avatars") or {}
    kernel = avatars.get("avatar_kernel", "loop")
    problem = None if kernel == "loop" else unserved(model.get("method"), avatars.get("perturbation", "dropout"))
    if problem:
        raise UserError(f"--avatar-kernel {kernel}: {problem}")


def set_epochs(cfg: Dict[str, Any], epochs: int, *, keep_steps: bool = False) -> str:
    """A config's run length in epochs (evaluation at the end); the step schedule follows
    (mmdet's 8/12 and 11/12) unless ``keep_steps`` (a resumed run keeps the steps it has had)."""
    runner = cfg.get("runner") or {}
    if "max_epochs" not in runner:
        raise UserError(f"--epochs: this config runs {runner.get('type', 'no runner')} by iterations "
                        f"(max_iters); set its length with --iters or --cfg-options runner.max_iters=N")
    cfg["runner"] = dict(runner, max_epochs=epochs)
    if "evaluation" in cfg:
        cfg["evaluation"] = dict(cfg["evaluation"], interval=epochs)
    lr_config = dict(cfg.get("lr_config") or {})
    if lr_config.get("policy") == "step" and not keep_steps:
        lr_config["step"] = lr_steps(epochs)
        cfg["lr_config"] = lr_config
    steps = f", learning-rate steps at {lr_config['step']}" if lr_config.get("policy") == "step" else ""
    return f"{epochs} epoch{'s' if epochs != 1 else ''}{steps}"


LOGGER_HOOKS = {"tensorboard": ("tensorboard", dict(type="TensorboardLoggerHook")),
                "wandb": ("wandb", dict(type="WandbLoggerHook", init_kwargs=dict(project="akd")))}


def add_loggers(cfg: Dict[str, Any], loggers) -> None:
    """mmcv's logger hooks for ``--logger`` (every logged scalar: losses, each AKD term per level,
    the paper's running sigma, the learning rate, validation AP); refused when the package is missing."""
    import importlib.util

    hooks = list((cfg.get("log_config") or {}).get("hooks") or [])
    for name in loggers:
        package, hook = LOGGER_HOOKS[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--logger {name} needs the {package} package: pip install {package}")
        if not any(h.get("type") == hook["type"] for h in hooks):
            hooks.append(copy.deepcopy(hook))
    if loggers:
        cfg["log_config"] = dict(cfg.get("log_config") or {"interval": 50}, hooks=hooks)


def apply_options(cfg: Dict[str, Any], options: TrainOptions) -> list:
    """The command line's options applied to a config file's contents (``--config``), each where
    it belongs, or refused in one line where the config has no such thing; returns notes."""
    notes = []
    model = cfg.get("model") or {}
    distils = model.get("type") == "AKDDistiller" and model.get("teacher") is not None
    learns_tokens = model.get("type") == "ReceptiveTokenLearner"
    if options.kind != "student":
        raise UserError("--train-teacher and --learn-tokens make their config from a preset: use --preset")
    if options.method is not None:
        raise UserError("--method picks a preset's base loss with its settings; a config file fixes its own "
                        "(model.method and model.options): edit it, or use --preset")
    if options.data_root:
        from akd_cli.mm.data import move_onto

        notes.append(move_onto(cfg, options.data_root).describe())
    if options.teacher_checkpoint:
        if distils:
            model["teacher_checkpoint"] = options.teacher_checkpoint
        elif learns_tokens:
            model["checkpoint"] = options.teacher_checkpoint
        else:
            raise UserError("--teacher-checkpoint: this config has no teacher (it trains a detector alone)")
    for name in AVATAR_OPTIONS:
        value = getattr(options, name)
        if value is None:
            continue
        if not distils:
            raise UserError(f"{SHAPING_OPTIONS[name]}: this config distils nothing (model type "
                            f"{model.get('type')!r} without a teacher), so it has no Avatars")
        model["avatars"] = dict(model.get("avatars") or {}, **{name: value})
    if distils:
        check_avatar_kernel(model)
    if options.token_file:
        if not (distils and model.get("method") == "maskd"):
            raise UserError("--token-file: receptive tokens are for a MasKD distillation; this config is not one")
        model["options"] = dict(model.get("options") or {}, token_file=options.token_file)
    if options.epochs:
        notes.append(f"--config: {set_epochs(cfg, options.epochs)}")
    if options.iters:
        raise UserError("--iters sets the length of --learn-tokens, which makes its config from a preset")
    if options.batch_size:
        cfg["data"] = dict(cfg["data"], samples_per_gpu=options.batch_size)
    add_loggers(cfg, options.loggers)
    return notes


def _saved(cfg: Dict[str, Any], name: str):
    """What a saved run config holds for a shaping option (None where it has no such thing)."""
    model = cfg.get("model") or {}
    if name in AVATAR_OPTIONS:
        return (model.get("avatars") or {}).get(name)
    return {"method": (cfg.get("akd") or {}).get("method"), "teacher_checkpoint": model.get("teacher_checkpoint"),
            "token_file": (model.get("options") or {}).get("token_file"), "data_root": cfg.get("data_root"),
            "batch_size": (cfg.get("data") or {}).get("samples_per_gpu")}.get(name)


def _same(given, saved) -> bool:
    """An option equal to what the run already has (paths compared as files) changes nothing."""
    import os

    if isinstance(given, str) and isinstance(saved, str) and ("/" in given or "/" in saved):
        return os.path.realpath(given.rstrip("/")) == os.path.realpath(saved.rstrip("/"))
    return given == saved


def resume_config(cfg: Dict[str, Any], options: TrainOptions, done_epochs: Optional[int]) -> list:
    """A resumed run's saved config with what a resume may change: ``--epochs`` extends the run
    (its learning-rate steps stay), ``--cfg-options`` apply; options that would make it another
    run are refused. Returns notes."""
    changed = [flag for name, flag in SHAPING_OPTIONS.items()
               if getattr(options, name) is not None and not _same(getattr(options, name), _saved(cfg, name))]
    if changed:
        raise UserError(f"--resume continues the run as its config.py has it; {', '.join(changed)} would make it "
                        "another run: start one in a new --work-dir (or change the saved config with --cfg-options)")
    notes = []
    before = (cfg.get("runner") or {}).get("max_epochs")
    if options.epochs and options.epochs != before:
        if done_epochs is not None and options.epochs < done_epochs:
            raise UserError(f"--epochs {options.epochs}: the run has already trained {done_epochs} epochs; "
                            "--resume --epochs N extends it beyond that")
        notes.append(f"resuming, extended from {before} to {set_epochs(cfg, options.epochs, keep_steps=True)}")
    if options.iters:
        runner = cfg.get("runner") or {}
        if "max_iters" not in runner:
            raise UserError("--iters: this run counts epochs; extend it with --epochs")
        cfg["runner"] = dict(runner, max_iters=options.iters)
        notes.append(f"resuming, extended to {options.iters} iterations")
    add_loggers(cfg, options.loggers)
    return notes

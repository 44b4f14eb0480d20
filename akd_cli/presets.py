"""Presets: named distillation set-ups stored as data in ``presets/*.yaml``, validated on load.

A preset names a student and a teacher (each an mmdet config, either ``mmdet://<path>`` inside the
installed mmdet's own config tree, a file path, or an inline ``model`` mapping), the teacher's
checkpoint, which features to distil with which base loss, the Avatar settings, the schedule, the
dataset, and the paper's reference mAPs. Only PyYAML and the standard library are imported here.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from akd_cli.errors import UserError
import re

from akd_cli.names import (AVATAR_WEIGHTINGS, BASE_LOSSES, FAMILIES, HEAD_LOSSES, PAPER_TABLES, PERTURBATIONS,
                           UNCERTAINTY_MODES)

PRESET_DIR = Path(os.environ.get("AKD_PRESET_DIR", Path(__file__).resolve().parent.parent / "presets"))


class PresetError(UserError):
    """A preset file that does not validate: names the file and the field."""


SOURCE = re.compile(r"^[\w.-]+/[\w.-]+:\S+$")  # owner/repo:path
OPTIMIZER_PARTS = {"losses": "akd_losses"}      # a preset's name -> the distiller's module prefix
FIXED_BY_DEFAULT = ("losses",)                  # every row's config: lr_mult 0 on distiller.losses


@dataclass
class ModelSpec:
    config: Optional[str] = None          # mmdet://path, or a config file
    model: Optional[Dict[str, Any]] = None  # an inline mmdet model dict (tiny presets)
    checkpoint: Optional[str] = None
    reference_map: Optional[float] = None
    name: str = ""
    overrides: Dict[str, Any] = field(default_factory=dict)  # dotted keys into the model dict


@dataclass
class FeatureSpec:
    name: str
    student: str
    teacher: str
    channels: List[int]
    student_channels: Optional[List[int]] = None  # where they differ from the teacher: 1x1 align convs
    align: bool = False                           # a trained 1x1 conv per level even where they agree
    levels: Optional[List[int]] = None            # a selection of the module's outputs (default: all)


@dataclass
class StudentInputs:
    """A teacher module called with the student's inputs at these argument positions (the student's
    RoIs for the teacher's RoI extractor), as MMRazor's ``modules_with_student_inputs``."""
    student: str
    teacher: str
    indices: List[int]


@dataclass
class HeadSpec:
    name: str
    student: str
    teacher: str
    loss: str                                   # names.HEAD_LOSSES
    weight: float = 1.0
    options: Dict[str, Any] = field(default_factory=dict)  # beta, gamma, use_sigmoid
    student_inputs: Optional[StudentInputs] = None


@dataclass
class ScheduleSpec:
    epochs: int = 24
    lr: Optional[float] = None                  # None: the student config's
    warmup: Optional[str] = None                # linear | constant | exp; None: the student config's
    warmup_iters: Optional[int] = None
    warmup_ratio: Optional[float] = None
    grad_clip: Optional[float] = None           # max norm; None: the student config's
    no_grad_clip: bool = False                  # the recipe clips nothing (overrides the student config)
    bias_lr_mult: Optional[float] = None
    bias_decay_mult: Optional[float] = None


@dataclass
class Preset:
    name: str
    description: str
    student: ModelSpec
    teacher: ModelSpec
    method: str
    options: Dict[str, Any]
    features: List[FeatureSpec]
    heads: List[HeadSpec] = field(default_factory=list)
    init_from_teacher: List[str] = field(default_factory=list)  # student module prefixes
    optimizer_fixed: List[str] = field(default_factory=lambda: list(FIXED_BY_DEFAULT))
    family: Optional[str] = None
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    sources: Dict[str, str] = field(default_factory=dict)
    aliases: List[str] = field(default_factory=list)
    variant_of: Optional[str] = None
    reference_kd_map: Optional[float] = None
    reference_kd_source: Optional[str] = None
    num_avatars: int = 1
    drop_rate: float = 0.1
    uncertainty: str = "release"
    weighting: str = "mean"
    perturbation: str = "dropout"
    sigma_momentum: float = 0.1
    epochs: int = 24
    data: Dict[str, Any] = field(default_factory=dict)
    table: Optional[str] = None
    table_row: int = 0
    reference_akd_map: Optional[float] = None
    tiny: bool = False
    path: Optional[Path] = None


def _fail(path: Path, where: str, message: str):
    raise PresetError(f"{path.name}: {where}: {message}")


def _get(mapping: dict, key: str, kind, path: Path, where: str, required: bool = True, default=None):
    if key not in mapping or mapping[key] is None:
        if required:
            _fail(path, f"{where}.{key}" if where else key, "missing")
        return default
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        _fail(path, f"{where}.{key}" if where else key, f"expected {kind_name(kinds)}, got {value!r}")
    if float in kinds and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kinds):
        _fail(path, f"{where}.{key}" if where else key, f"expected {kind_name(kinds)}, got {value!r}")
    return value


def kind_name(kinds) -> str:
    return " or ".join({str: "text", int: "an integer", float: "a number", dict: "a mapping",
                        list: "a list", bool: "true/false"}[k] for k in kinds)


def _model(raw: dict, role: str, path: Path) -> ModelSpec:
    section = _get(raw, role, dict, path, "")
    allowed = {"config", "model", "checkpoint", "reference_map", "name", "overrides"}
    unknown = set(section) - allowed
    if unknown:
        _fail(path, f"{role}.{sorted(unknown)[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    spec = ModelSpec(
        config=_get(section, "config", str, path, role, required=False),
        model=_get(section, "model", dict, path, role, required=False),
        checkpoint=_get(section, "checkpoint", str, path, role, required=False),
        reference_map=_get(section, "reference_map", float, path, role, required=False),
        name=_get(section, "name", str, path, role, required=False, default=""),
        overrides=_get(section, "overrides", dict, path, role, required=False, default={}),
    )
    if (spec.config is None) == (spec.model is None):
        _fail(path, role, "give exactly one of 'config' (an mmdet config) or 'model' (an inline model)")
    if spec.reference_map is not None and not 0 <= spec.reference_map <= 100:
        _fail(path, f"{role}.reference_map", f"must be a COCO mAP in [0, 100], got {spec.reference_map}")
    return spec


def _features(raw: dict, path: Path) -> List[FeatureSpec]:
    items = _get(raw, "features", list, path, "distill")
    if not items:
        _fail(path, "distill.features", "needs at least one feature to distil")
    features = []
    for i, item in enumerate(items):
        where = f"distill.features[{i}]"
        if not isinstance(item, dict):
            _fail(path, where, f"expected a mapping, got {item!r}")
        channels = _get(item, "channels", (int, list), path, where)
        channels = [channels] if isinstance(channels, int) else channels
        student_channels = _get(item, "student_channels", (int, list), path, where, required=False)
        if isinstance(student_channels, int):
            student_channels = [student_channels] * len(channels)
        for name, values in (("channels", channels), ("student_channels", student_channels or [])):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in values):
                _fail(path, f"{where}.{name}", f"must be positive integers, got {values!r}")
        if student_channels is not None and len(student_channels) != len(channels):
            _fail(path, f"{where}.student_channels", "needs one entry per level of 'channels'")
        _only(item, {"name", "student", "teacher", "channels", "student_channels", "align"}, path, where)
        features.append(FeatureSpec(
            name=_get(item, "name", str, path, where), student=_get(item, "student", str, path, where),
            teacher=_get(item, "teacher", str, path, where), channels=channels,
            student_channels=student_channels, align=_get(item, "align", bool, path, where, required=False,
                                                          default=False)))
    names = [f.name for f in features]
    if len(set(names)) != len(names):
        _fail(path, "distill.features", f"feature names must be unique, got {names}")
    return features


def _only(mapping: dict, allowed, path: Path, where: str) -> None:
    unknown = set(mapping) - set(allowed)
    if unknown:
        _fail(path, f"{where}.{sorted(unknown)[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _heads(distill: dict, path: Path) -> List[HeadSpec]:
    heads = []
    for i, item in enumerate(_get(distill, "heads", list, path, "distill", required=False, default=[])):
        where = f"distill.heads[{i}]"
        if not isinstance(item, dict):
            _fail(path, where, f"expected a mapping, got {item!r}")
        _only(item, {"name", "student", "teacher", "loss", "weight", "options", "student_inputs"}, path, where)
        loss = _get(item, "loss", str, path, where)
        if loss not in HEAD_LOSSES:
            _fail(path, f"{where}.loss", f"unknown head loss {loss!r} (one of {', '.join(HEAD_LOSSES)})")
        weight = _get(item, "weight", float, path, where, required=False, default=1.0)
        if weight < 0:
            _fail(path, f"{where}.weight", f"must be >= 0, got {weight}")
        inputs = _get(item, "student_inputs", dict, path, where, required=False)
        if inputs is not None:
            _only(inputs, {"student", "teacher", "indices"}, path, f"{where}.student_inputs")
            indices = _get(inputs, "indices", list, path, f"{where}.student_inputs")
            if not indices or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in indices):
                _fail(path, f"{where}.student_inputs.indices", f"must be argument positions >= 0, got {indices!r}")
            inputs = StudentInputs(student=_get(inputs, "student", str, path, f"{where}.student_inputs"),
                                   teacher=_get(inputs, "teacher", str, path, f"{where}.student_inputs"),
                                   indices=indices)
        heads.append(HeadSpec(name=_get(item, "name", str, path, where), student=_get(item, "student", str, path, where),
                              teacher=_get(item, "teacher", str, path, where), loss=loss, weight=weight,
                              options=_get(item, "options", dict, path, where, required=False, default={}),
                              student_inputs=inputs))
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
        _fail(path, "distill.heads", f"head term names must be unique, got {names}")
    return heads


def _names_list(mapping: dict, key: str, path: Path, where: str, default=()) -> List[str]:
    values = _get(mapping, key, list, path, where, required=False, default=list(default))
    if not all(isinstance(v, str) and v for v in values):
        _fail(path, f"{where}.{key}" if where else key, f"expected a list of names, got {values!r}")
    return list(values)


def _schedule(raw: dict, path: Path) -> ScheduleSpec:
    section = _get(raw, "schedule", dict, path, "", required=False, default={})
    fields_ = {"epochs", "lr", "warmup", "warmup_iters", "warmup_ratio", "grad_clip", "bias_lr_mult", "bias_decay_mult"}
    _only(section, fields_, path, "schedule")
    spec = ScheduleSpec(
        epochs=_get(section, "epochs", int, path, "schedule", required=False, default=24),
        lr=_get(section, "lr", float, path, "schedule", required=False),
        warmup=_get(section, "warmup", str, path, "schedule", required=False),
        warmup_iters=_get(section, "warmup_iters", int, path, "schedule", required=False),
        warmup_ratio=_get(section, "warmup_ratio", float, path, "schedule", required=False),
        bias_lr_mult=_get(section, "bias_lr_mult", float, path, "schedule", required=False),
        bias_decay_mult=_get(section, "bias_decay_mult", float, path, "schedule", required=False))
    clip = section.get("grad_clip")
    if clip == "none":
        spec.no_grad_clip = True
    elif clip is not None:
        spec.grad_clip = _get(section, "grad_clip", float, path, "schedule")
        if spec.grad_clip <= 0:
            _fail(path, "schedule.grad_clip", f"must be > 0 (or 'none'), got {spec.grad_clip}")
    if spec.epochs < 1:
        _fail(path, "schedule.epochs", f"must be >= 1, got {spec.epochs}")
    if spec.lr is not None and spec.lr <= 0:
        _fail(path, "schedule.lr", f"must be > 0, got {spec.lr}")
    if spec.warmup is not None and spec.warmup not in ("linear", "constant", "exp"):
        _fail(path, "schedule.warmup", f"must be linear, constant or exp, got {spec.warmup!r}")
    return spec


def load_preset_file(path: Path) -> Preset:
    import yaml

    path = Path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise PresetError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PresetError(f"{path.name}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        _fail(path, "top level", "expected a mapping")
    allowed = {"name", "description", "student", "teacher", "distill", "avatars", "schedule", "data",
               "table", "table_row", "reference_akd_map", "reference_kd", "tiny", "family", "sources", "aliases",
               "variant_of"}
    unknown = set(raw) - allowed
    if unknown:
        _fail(path, sorted(unknown)[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    name = _get(raw, "name", str, path, "")
    if name != path.stem:
        _fail(path, "name", f"must equal the file name {path.stem!r}, got {name!r}")
    distill = _get(raw, "distill", dict, path, "")
    _only(distill, {"method", "options", "features", "heads", "init_from_teacher", "optimizer_fixed"}, path, "distill")
    method = _get(distill, "method", str, path, "distill")
    if method not in BASE_LOSSES:
        _fail(path, "distill.method", f"unknown method {method!r} (one of {', '.join(BASE_LOSSES)})")
    avatars = _get(raw, "avatars", dict, path, "", required=False, default={})
    num = _get(avatars, "num_avatars", int, path, "avatars", required=False, default=1)
    drop_rate = _get(avatars, "drop_rate", float, path, "avatars", required=False, default=0.1)
    _only(avatars, {"num_avatars", "drop_rate", "uncertainty", "weighting", "perturbation", "sigma_momentum"}, path,
          "avatars")
    uncertainty = _get(avatars, "uncertainty", str, path, "avatars", required=False, default="release")
    weighting = _get(avatars, "weighting", str, path, "avatars", required=False, default="mean")
    perturbation = _get(avatars, "perturbation", str, path, "avatars", required=False, default="dropout")
    sigma_momentum = _get(avatars, "sigma_momentum", float, path, "avatars", required=False, default=0.1)
    if num < 0:
        _fail(path, "avatars.num_avatars", f"must be >= 0, got {num}")
    if not 0 <= drop_rate < 1:
        _fail(path, "avatars.drop_rate", f"must be in [0, 1), got {drop_rate}")
    if uncertainty not in UNCERTAINTY_MODES:
        _fail(path, "avatars.uncertainty", f"unknown mode {uncertainty!r} (one of {', '.join(UNCERTAINTY_MODES)})")
    if perturbation not in PERTURBATIONS:
        _fail(path, "avatars.perturbation", f"unknown {perturbation!r} (one of {', '.join(PERTURBATIONS)})")
    if weighting not in AVATAR_WEIGHTINGS:
        _fail(path, "avatars.weighting", f"unknown {weighting!r} (one of {', '.join(AVATAR_WEIGHTINGS)})")
    if not 0 < sigma_momentum <= 1:
        _fail(path, "avatars.sigma_momentum", f"must be in (0, 1], got {sigma_momentum}")
    schedule = _schedule(raw, path)
    fixed = _names_list(distill, "optimizer_fixed", path, "distill", FIXED_BY_DEFAULT)
    for part in fixed:
        if part not in OPTIMIZER_PARTS:
            _fail(path, "distill.optimizer_fixed", f"unknown part {part!r} (one of {', '.join(OPTIMIZER_PARTS)})")
    family = _get(raw, "family", str, path, "", required=False)
    if family is not None and family not in FAMILIES:
        _fail(path, "family", f"must be one of {', '.join(FAMILIES)}, got {family!r}")
    sources = _get(raw, "sources", dict, path, "", required=False, default={})
    for key, value in sources.items():
        if not isinstance(value, str) or not all(SOURCE.match(v.strip()) for v in value.split(",")):
            _fail(path, f"sources.{key}", f"expected owner/repo:path (comma-separated), got {value!r}")
    kd = _get(raw, "reference_kd", dict, path, "", required=False, default={})
    _only(kd, {"map", "source"}, path, "reference_kd")
    table = _get(raw, "table", str, path, "", required=False)
    if table is not None and table not in PAPER_TABLES:
        _fail(path, "table", f"must be one of {', '.join(PAPER_TABLES)}, got {table!r}")
    return Preset(
        name=name, description=_get(raw, "description", str, path, ""),
        student=_model(raw, "student", path), teacher=_model(raw, "teacher", path),
        method=method, options=_get(distill, "options", dict, path, "distill", required=False, default={}),
        features=_features(distill, path), heads=_heads(distill, path),
        init_from_teacher=_names_list(distill, "init_from_teacher", path, "distill"), optimizer_fixed=fixed,
        family=family, schedule=schedule, sources=dict(sources), aliases=_names_list(raw, "aliases", path, ""),
        variant_of=_get(raw, "variant_of", str, path, "", required=False),
        reference_kd_map=_get(kd, "map", float, path, "reference_kd", required=False),
        reference_kd_source=_get(kd, "source", str, path, "reference_kd", required=False),
        num_avatars=num, drop_rate=drop_rate, uncertainty=uncertainty,
        weighting=weighting, perturbation=perturbation, sigma_momentum=sigma_momentum, epochs=schedule.epochs,
        data=_get(raw, "data", dict, path, "", required=False, default={}), table=table,
        table_row=_get(raw, "table_row", int, path, "", required=False, default=0),
        reference_akd_map=_get(raw, "reference_akd_map", float, path, "", required=False),
        tiny=_get(raw, "tiny", bool, path, "", required=False, default=False), path=path,
    )


@dataclass
class MethodSetting:
    """A base loss's settings for one detector family, from its own COCO config (see
    ``presets/_method_settings.yaml``)."""
    method: str
    family: str
    options: Dict[str, Any]
    source: str
    grad_clip: Optional[float] = None
    init_from_teacher: List[str] = field(default_factory=list)
    module: Optional[str] = None          # "neck.fpn_convs.{i}.conv" (one module per level) or "neck"
    levels: Optional[List[int]] = None


METHOD_SETTINGS_FILE = "_method_settings.yaml"


def method_setting(method: str, family: Optional[str], directory: Path = PRESET_DIR) -> Optional[MethodSetting]:
    """X's published settings for a family, or None where its authors published none."""
    import yaml

    path = Path(directory) / METHOD_SETTINGS_FILE
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    entry = (raw.get(method) or {}).get(family) if family else None
    if entry is None:
        return None
    where = f"{method}.{family}"
    _only(entry, {"options", "source", "grad_clip", "init_from_teacher", "features"}, path, where)
    features = _get(entry, "features", dict, path, where, required=False, default={})
    source = _get(entry, "source", str, path, where)
    if not SOURCE.match(source):
        _fail(path, f"{where}.source", f"expected owner/repo:path, got {source!r}")
    return MethodSetting(method=method, family=family, options=dict(_get(entry, "options", dict, path, where)),
                         source=source, grad_clip=_get(entry, "grad_clip", float, path, where, required=False),
                         init_from_teacher=_names_list(entry, "init_from_teacher", path, where),
                         module=features.get("module"), levels=features.get("levels"))


def preset_paths(directory: Path = PRESET_DIR) -> Dict[str, Path]:
    return {p.stem: p for p in sorted(Path(directory).glob("*.yaml")) if not p.stem.startswith("_")}


def _spelled(name: str) -> str:
    """The design's spelling, teacher-to-student ("fcos-r101-to-r50"), names the same preset."""
    return name.replace("-to-", "-")


def list_presets(directory: Path = PRESET_DIR) -> List[Preset]:
    return [load_preset_file(p) for p in preset_paths(directory).values()]


def load_preset(name_or_path: str, directory: Path = PRESET_DIR) -> Preset:
    """A preset by name (``presets/<name>.yaml``, or an alias a preset declares; "-to-" between
    teacher and student is optional) or by a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise PresetError(f"preset file not found: {candidate}")
        return load_preset_file(candidate)
    paths = preset_paths(directory)
    for name in (name_or_path, _spelled(name_or_path)):
        if name in paths:
            return load_preset_file(paths[name])
    for preset in list_presets(directory):
        if name_or_path in preset.aliases:
            return preset
    known = list(paths) + [a for p in list_presets(directory) for a in p.aliases]
    close = difflib.get_close_matches(name_or_path, known, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known presets: {', '.join(paths)}"
    raise PresetError(f"unknown preset {name_or_path!r}{hint} (see 'akd presets')")

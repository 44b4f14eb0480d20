"""Input checks done before any work starts, and the translation of known failures into one line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from akd_cli.errors import UserError


def check_annotation_file(path: Path, role: str = "annotation") -> None:
    """The file exists and is a COCO detection JSON (images, annotations, categories)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{role} file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO detection file (needs 'images', 'annotations' and 'categories' lists)")
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("image_id", "bbox", "category_id")),
                        ("categories", ("id", "name"))):
        for item in data[key][:1000]:
            if not isinstance(item, dict) or any(field not in item for field in fields):
                raise UserError(f"{path}: an entry of '{key}' lacks one of {', '.join(fields)}: {str(item)[:80]}")


def check_dataset(data_cfg: dict, splits=("train", "val"), synthetic: bool = False) -> None:
    """Annotation files and image folders named by an mmdet ``data`` section exist and parse.
    ``synthetic``: the dataset is akd's synthetic one, so a missing one can be generated."""
    for split in splits:
        section = data_cfg.get(split)
        if section is None:
            continue
        section = section.get("dataset", section)  # RepeatDataset and friends
        ann_file, prefix = section.get("ann_file"), section.get("img_prefix")
        if isinstance(ann_file, str):
            if not Path(ann_file).exists():
                hint = f"; generate it with 'akd data synth --out {Path(ann_file).parent.parent}'" if synthetic else ""
                raise UserError(f"{split} annotations not found: {ann_file}{hint} (or pass --data-root)")
            check_annotation_file(Path(ann_file), f"{split} annotation")
        if isinstance(prefix, str) and prefix and not Path(prefix).is_dir():
            raise UserError(f"{split} image folder not found: {prefix}")


def check_checkpoint_path(checkpoint: Optional[str], role: str) -> None:
    if checkpoint and "://" not in checkpoint and not Path(checkpoint).expanduser().is_file():
        raise UserError(f"{role} checkpoint not found: {checkpoint}")


def friendly_message(exc: BaseException) -> Optional[str]:
    """One line for failures a user can act on; None for bugs (those keep their traceback)."""
    from akd_cli.mm.checkpoints import CheckpointLoadError, CheckpointMismatch

    if isinstance(exc, (UserError, CheckpointLoadError, CheckpointMismatch, FileNotFoundError, FloatingPointError)):
        return str(exc)
    return None

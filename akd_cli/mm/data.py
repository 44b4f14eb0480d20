"""The user's dataset: where its splits are, which categories it has, and whether it can be trained on.

A dataset root is either COCO's own layout (``annotations/instances_{train,val}2017.json`` with
``train2017/`` and ``val2017/``) or akd's synthetic one (``annotations/instances_{train,val}.json``
with ``train/`` and ``val/``). Its categories (any ids, any names) come from the training
annotation file, in id order: that order is the label order mmdet's CocoDataset uses when it is
given the names, so every category is kept and results map back to the file's own ids.

Standard library only: this runs before a config is built and before any worker starts.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from akd_cli.errors import UserError

# layout name -> (annotation file, image folder), per split
LAYOUTS = {
    "coco": ("annotations/instances_{split}2017.json", "{split}2017/"),
    "synth": ("annotations/instances_{split}.json", "{split}/"),
}
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    ann_file: str
    img_prefix: str


@dataclass(frozen=True)
class Dataset:
    """A dataset root as akd trains on it: its layout, its splits and its categories."""
    root: str
    layout: str                                 # a key of LAYOUTS
    splits: Dict[str, Split]
    categories: Tuple[Tuple[int, str], ...]     # (id, name), in id order
    source: str = ""                            # the annotation file they come from

    @property
    def classes(self) -> Tuple[str, ...]:
        return tuple(name for _, name in self.categories)

    def describe(self) -> str:
        shown = self.categories[:8]
        listing = ", ".join(f"{i} {name}" for i, name in shown) + (", ..." if len(self.categories) > len(shown) else "")
        return (f"data: {self.root} ({self.layout} layout), {len(self.categories)} categories from "
                f"{os.path.basename(self.source)} ({listing}); heads sized to {len(self.categories)}")


def find_layout(root: str) -> Optional[str]:
    """The layout whose training annotation file the root holds (None if neither)."""
    for name, (ann, _) in LAYOUTS.items():
        if os.path.isfile(os.path.join(root, ann.format(split="train"))):
            return name
    return None


def open_dataset(root: str, *, required: bool, synthetic: bool = False, categories_from: str = "train") -> Optional[Dataset]:
    """The dataset at ``root``; when it holds neither layout: a UserError if ``required`` (the user
    named it), else None (a preset's default root not made yet: the data check says how to make it).
    ``synthetic``: a tiny preset's data, which `akd data synth` can make (said so).
    ``categories_from``: the split whose file names the categories (evaluation reads val's: COCO's
    train file is 450 MB; training reads train's, and the data check holds val's to the same)."""
    layout = find_layout(root)
    if layout is None:
        if not required:
            return None
        if not os.path.isdir(root):
            hint = f"; generate synthetic data there with 'akd data synth --out {root}'" if synthetic else ""
            raise UserError(f"data root not found: {root}{hint}")
        raise UserError(f"{root} is not a COCO-format dataset: expected annotations/instances_train2017.json with "
                        "train2017/ (COCO's layout) or annotations/instances_train.json with train/ (akd data synth's)")
    ann, images = LAYOUTS[layout]
    base = root.rstrip("/") + "/"
    splits = {s: Split(base + ann.format(split=s), base + images.format(split=s)) for s in SPLITS}
    source = splits[categories_from].ann_file
    if not os.path.isfile(source):
        raise UserError(f"{categories_from} annotations not found: {source}")
    summary = summarise(source)
    return Dataset(root=root, layout=layout, splits=splits, categories=summary.categories, source=source)


@dataclass(frozen=True)
class Summary:
    """What the data checks need from one annotation file (kept instead of the parsed JSON)."""
    categories: Tuple[Tuple[int, str], ...]
    image_files: Tuple[str, ...]
    annotations: int
    degenerate_boxes: int        # width or height not positive
    small_boxes: int             # under one pixel wide or high, positive (mmdet drops these too)
    unknown_category: int        # category ids the categories list lacks
    images_with_boxes: int


def summarise(path: str) -> Summary:
    """The annotation file checked (COCO detection JSON) and summarised; one line on any defect."""
    stat = os.stat(path)
    return _summarise(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _summarise(path: str, mtime_ns: int, size: int) -> Summary:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO detection file (needs 'images', 'annotations' and 'categories' lists)")
    required = {"images": ("id", "file_name"), "annotations": ("image_id", "bbox", "category_id", "area"),
                "categories": ("id", "name")}
    for key, fields in required.items():
        for item in data[key]:
            if not isinstance(item, dict) or any(field not in item for field in fields):
                raise UserError(f"{path}: an entry of '{key}' lacks one of {', '.join(fields)}: {str(item)[:80]}")
    categories = sorted((c["id"], str(c["name"])) for c in data["categories"])
    names = [name for _, name in categories]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{path}: category names must be unique (mmdet selects categories by name): {', '.join(duplicates)}")
    ids = {i for i, _ in categories}
    degenerate = small = unknown = 0
    with_boxes = set()
    for ann in data["annotations"]:
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise UserError(f"{path}: a bbox is not [x, y, width, height]: {str(box)[:80]}")
        if ann["category_id"] not in ids:
            unknown += 1
        elif box[2] <= 0 or box[3] <= 0:
            degenerate += 1
        elif box[2] < 1 or box[3] < 1:
            small += 1
        elif not ann.get("iscrowd", 0):
            with_boxes.add(ann["image_id"])
    return Summary(categories=tuple(categories), image_files=tuple(str(i["file_name"]) for i in data["images"]),
                   annotations=len(data["annotations"]), degenerate_boxes=degenerate, small_boxes=small,
                   unknown_category=unknown, images_with_boxes=len(with_boxes))


def missing_images(summary: Summary, img_prefix: str) -> List[str]:
    """The images the annotations name that the folder lacks."""
    try:
        present = set(os.listdir(img_prefix))
    except OSError:
        return list(summary.image_files)
    return [f for f in summary.image_files
            if not (f in present if "/" not in f else os.path.isfile(os.path.join(img_prefix, f)))]


def split_of(data_cfg: Dict[str, Any], split: str) -> Optional[Dict[str, Any]]:
    """An mmdet data section's dataset (inside RepeatDataset and friends); None when absent."""
    section = data_cfg.get(split)
    while isinstance(section, dict) and "ann_file" not in section and isinstance(section.get("dataset"), dict):
        section = section["dataset"]
    return section


def check_data(data_cfg: Dict[str, Any], splits=("train", "val"), synthetic: bool = False,
               warn=None) -> None:
    """Before anything starts: the annotation files and image folders of an mmdet ``data`` section
    exist and parse, name no image the disk lacks, hold images (and, to train on, boxes), and agree
    on their categories. Boxes mmdet will drop (non-positive or sub-pixel size, unknown category) are
    counted and told through ``warn``. ``synthetic``: a missing dataset can be generated (said so)."""
    seen = {}
    for split in splits:
        section = split_of(data_cfg, split)
        if section is None:
            continue
        ann_file, prefix = section.get("ann_file"), section.get("img_prefix")
        if not isinstance(ann_file, str):
            continue
        if not os.path.exists(ann_file):
            hint = f"; generate it with 'akd data synth --out {Path(ann_file).parent.parent}'" if synthetic else ""
            raise UserError(f"{split} annotations not found: {ann_file}{hint} (or pass --data-root)")
        summary = summarise(ann_file)
        if isinstance(prefix, str) and prefix and not os.path.isdir(prefix):
            raise UserError(f"{split} image folder not found: {prefix}")
        if not summary.image_files:
            raise UserError(f"the {split} split is empty: {ann_file} lists no images")
        if split == "train" and not summary.images_with_boxes:
            raise UserError(f"the train split has no usable boxes: {ann_file} ({summary.annotations} annotations)")
        if isinstance(prefix, str) and prefix:
            missing = missing_images(summary, prefix)
            if missing:
                raise UserError(f"{len(missing)} of {len(summary.image_files)} {split} images named in {ann_file} are "
                                f"not in {prefix} (first: {', '.join(missing[:3])})")
        dropped = [(summary.degenerate_boxes, "of non-positive size"), (summary.small_boxes, "under one pixel wide or high"),
                   (summary.unknown_category, "with a category id the file's categories lack")]
        for count, what in dropped:
            if count and warn:
                warn(f"{split}: {count} of {summary.annotations} boxes {what} in {ann_file}: dropped (as mmdet does)")
        seen[split] = (ann_file, summary.categories)
    if "train" in seen:
        for split, (ann_file, categories) in seen.items():
            if categories != seen["train"][1]:
                raise UserError(f"the {split} annotations' categories differ from the train annotations' "
                                f"({ann_file}: {len(categories)}, {seen['train'][0]}: {len(seen['train'][1])})")


def use_dataset(cfg: Dict[str, Any], dataset: Dataset) -> None:
    """Point a config's train/val/test sections at the dataset and name its categories in each
    (train from the train split, val and test from the val split)."""
    for split in ("train", "val", "test"):
        section = split_of(cfg["data"], split)
        if section is None:
            continue
        source = dataset.splits["train" if split == "train" else "val"]
        section.update(ann_file=source.ann_file, img_prefix=source.img_prefix, classes=dataset.classes)
    cfg["data_root"] = dataset.root.rstrip("/") + "/"


def size_heads(model: Dict[str, Any], num_classes: int) -> None:
    """Every ``num_classes`` of a detector config (single-stage heads, each cascade stage's box
    head, mask heads) set to the data's; the RPN's objectness head has none."""
    if isinstance(model, dict):
        for key, value in model.items():
            if key == "num_classes" and isinstance(value, int):
                model[key] = num_classes
            else:
                size_heads(value, num_classes)
    elif isinstance(model, list):
        for item in model:
            size_heads(item, num_classes)


def move_onto(cfg: Dict[str, Any], root: str, categories_from: str = "train") -> Dataset:
    """A config moved onto the dataset at ``root``: its splits, its categories, every head of its
    model sized to them (a checkpoint trained on other categories then no longer fits)."""
    dataset = open_dataset(root, required=True, categories_from=categories_from)
    use_dataset(cfg, dataset)
    size_heads(cfg["model"], len(dataset.categories))
    return dataset

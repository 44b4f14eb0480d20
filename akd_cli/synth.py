"""A deterministic synthetic COCO-format detection dataset.

Objects are textured, coloured shapes (disc, box, triangle, ...) whose class is their geometry, drawn
with varied scale, aspect ratio and rotation onto cluttered backgrounds, occluding one another in
part. It exists so that detectors can be trained and evaluated for real on machines without COCO:
a small detector learns it in minutes on a CPU, a larger one learns it better.

Every image is a pure function of (seed, split, index), so the dataset is reproducible and a larger
dataset extends a smaller one. Only numpy, Pillow and the standard library are used.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

# Shapes as implicit functions of canonical coordinates (u, v) in [-1, 1]^2: True inside.
_SQRT3 = math.sqrt(3.0)


def _disc(u, v):
    return u * u + v * v <= 1.0


def _box(u, v):
    return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)


def _triangle(u, v):
    return (v <= 0.85) & (v >= 2.0 * np.abs(u) - 1.0)


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.36)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 1.0)) | ((au <= 1.0) & (av <= 0.3))


def _star(u, v):
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    return r <= 0.55 + 0.45 * np.cos(5.0 * theta)


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.0


def _hexagon(u, v):
    au, av = np.abs(u), np.abs(v)
    return (av <= _SQRT3 / 2) & (au * _SQRT3 / 2 + av / 2 <= _SQRT3 / 2)


def _crescent(u, v):
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.55)


def _bar(u, v):
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)


SHAPES: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disc": _disc, "box": _box, "triangle": _triangle, "ring": _ring, "cross": _cross,
    "star": _star, "diamond": _diamond, "hexagon": _hexagon, "crescent": _crescent, "bar": _bar,
}
MAX_CLASSES = len(SHAPES)
TEXTURES = ("solid", "stripes", "checker", "speckle")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Two specs that compare equal produce byte-identical datasets."""

    train_images: int = 256
    val_images: int = 64
    image_size: int = 128
    num_classes: int = 6
    max_objects: int = 6
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.train_images >= 1, f"train_images must be >= 1, got {self.train_images}"),
            (self.val_images >= 1, f"val_images must be >= 1, got {self.val_images}"),
            (32 <= self.image_size <= 2048, f"image_size must be in [32, 2048], got {self.image_size}"),
            (1 <= self.num_classes <= MAX_CLASSES,
             f"num_classes must be in [1, {MAX_CLASSES}], got {self.num_classes}"),
            (1 <= self.max_objects <= 30, f"max_objects must be in [1, 30], got {self.max_objects}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def class_names(self) -> List[str]:
        return list(SHAPES)[: self.num_classes]


# --- rendering -------------------------------------------------------------------------------------

def _random_colour(rng: np.random.Generator, hue: Optional[float] = None) -> np.ndarray:
    h = rng.random() if hue is None else hue % 1.0
    s = rng.uniform(0.45, 1.0)
    v = rng.uniform(0.45, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    coords = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(coords.astype(np.int64), cells - 1)
    frac = coords - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gradient with low-frequency colour noise, thin clutter lines and small blobs (unannotated)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle))
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    c0, c1 = _random_colour(rng) * 0.6, _random_colour(rng) * 0.6
    image = c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]
    for channel in range(3):
        image[..., channel] += (_smooth_noise(rng, size, int(rng.integers(3, 9))) - 0.5) * 60.0

    # Clutter: line segments and small dots, smaller or thinner than any object.
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.uniform(0, size, 2)
        length = rng.uniform(0.1, 0.5) * size
        theta = rng.uniform(0, math.pi)
        steps = max(int(length), 2)
        t = np.linspace(0, 1, steps)
        px = np.clip((x0 + t * length * math.cos(theta)).astype(int), 0, size - 1)
        py = np.clip((y0 + t * length * math.sin(theta)).astype(int), 0, size - 1)
        image[py, px] = _random_colour(rng) * 0.8
    for _ in range(int(rng.integers(2, 10))):
        r = rng.uniform(0.005, 0.02) * size + 0.5
        cx, cy = rng.uniform(0, size, 2)
        dot = (xx * (size - 1) - cx) ** 2 + (yy * (size - 1) - cy) ** 2 <= r * r
        image[dot] = _random_colour(rng) * 0.8
    return image


def _texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, colour: np.ndarray) -> np.ndarray:
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    out = np.broadcast_to(colour, u.shape + (3,)).copy()
    if kind == "stripes":
        freq, phase = rng.uniform(2.0, 5.0), rng.uniform(0, math.pi)
        second = np.clip(colour * rng.uniform(0.35, 0.7), 0, 255)
        out[np.sin(freq * math.pi * (u * math.cos(phase) + v * math.sin(phase))) > 0] = second
    elif kind == "checker":
        cells = rng.uniform(2.0, 4.0)
        second = np.clip(colour * rng.uniform(0.35, 0.7), 0, 255)
        out[(np.floor((u + 1) * cells) + np.floor((v + 1) * cells)) % 2 == 1] = second
    elif kind == "speckle":
        out += rng.normal(0.0, 25.0, out.shape).astype(np.float32)
    return out


def _object_mask(rng: np.random.Generator, size: int, shape: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[int, int]]:
    """Place one object: its mask within its local window, canonical coords and window origin."""
    scale = size * math.exp(rng.uniform(math.log(0.1), math.log(0.45)))
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    half_w, half_h = scale * math.sqrt(aspect) / 2, scale / math.sqrt(aspect) / 2
    rotation = rng.uniform(0, 2 * math.pi)
    extent = int(math.ceil(math.hypot(half_w, half_h))) + 1
    cx = rng.uniform(half_w * 0.5, size - half_w * 0.5)
    cy = rng.uniform(half_h * 0.5, size - half_h * 0.5)
    x0, y0 = max(int(cx) - extent, 0), max(int(cy) - extent, 0)
    x1, y1 = min(int(cx) + extent + 1, size), min(int(cy) + extent + 1, size)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    u = (dx * cos_r + dy * sin_r) / half_w
    v = (-dx * sin_r + dy * cos_r) / half_h
    return SHAPES[shape](u, v), u, v, (x0, y0)


def render_image(spec: SynthSpec, split: str, index: int) -> Tuple[np.ndarray, List[dict]]:
    """Render one image: (H x W x 3 uint8 RGB, objects with 'category' and a full-size 'mask')."""
    split_key = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, split_key, index]))
    size = spec.image_size
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # which object each pixel shows
    areas: List[int] = []      # each object's drawn area
    visible: List[int] = []    # each object's area still visible
    categories: List[int] = []
    wanted = int(rng.integers(1, spec.max_objects + 1))
    min_area = max(16, int(0.0008 * size * size))
    attempts = 0
    # A few retries per wanted object, and more if none fits yet: every image has an object
    # (mmdet's CocoDataset drops empty images from training).
    while len(categories) < wanted and (attempts < wanted * 4 or (not categories and attempts < 200)):
        attempts += 1
        category = int(rng.integers(spec.num_classes))
        mask, u, v, (x0, y0) = _object_mask(rng, size, list(SHAPES)[category])
        if mask.sum() < min_area:
            continue
        window = owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        # Reject placements that hide more than 60% of an object already there: occlusion stays partial.
        covered = np.bincount(window[mask & (window >= 0)], minlength=len(areas))
        remaining = np.array(visible, dtype=np.int64) - covered
        if np.any(remaining < 0.4 * np.array(areas, dtype=np.float64)):
            continue
        # Objects take a class-typical hue most of the time: colour helps, shape decides.
        hue = (category / spec.num_classes + rng.normal(0, 0.04)) if rng.random() < 0.6 else None
        pixels = _texture(rng, u, v, _random_colour(rng, hue))
        image_window = image[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        image_window[mask] = pixels[mask]
        window[mask] = len(categories)
        visible[:] = remaining.tolist()
        areas.append(int(mask.sum()))
        visible.append(int(mask.sum()))
        categories.append(category)
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)  # sensor noise
    objects = [{"category": c, "mask": owner == i} for i, c in enumerate(categories)]
    return np.clip(image, 0, 255).astype(np.uint8), objects


# --- COCO writing ----------------------------------------------------------------------------------

def _annotation(obj: dict, image_id: int, ann_id: int) -> Optional[dict]:
    from pycocotools import mask as mask_utils

    mask = obj["mask"]
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id, "image_id": image_id, "category_id": obj["category"] + 1,
        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "iscrowd": 0,
        "segmentation": rle,
    }


def _write_split(spec: SynthSpec, split: str, count: int, root: Path,
                 advance: Callable[[int], None]) -> dict:
    from PIL import Image

    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        pixels, objects = render_image(spec, split, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(root / split / file_name, optimize=False)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name,
                       "width": spec.image_size, "height": spec.image_size})
        for obj in objects:
            ann = _annotation(obj, image_id, len(annotations) + 1)
            if ann is not None:
                annotations.append(ann)
        advance(1)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(spec.class_names)]
    coco = {"info": {"description": "akd synthetic shapes", "version": FORMAT_VERSION, **asdict(spec)},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(coco, f)
    return coco


META_FILE = "akd-synth.json"


def read_meta(root: Path) -> Optional[dict]:
    try:
        with open(Path(root) / META_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generate(spec: SynthSpec, out: Path, *, force: bool = False,
             progress: Optional[Callable[[int], None]] = None) -> bool:
    """Write the dataset to `out`. Returns False (and writes nothing) when `out` already holds it.

    The dataset is written into a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a half-written dataset behind. An existing directory that holds
    something else is only replaced with `force`.
    """
    spec.validate()
    out = Path(out)
    meta = {"format_version": FORMAT_VERSION, **asdict(spec)}
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file; --out takes a directory")
        if read_meta(out) == meta:
            return False
        if any(out.iterdir()) and not force:
            raise FileExistsError(f"{out} exists and holds something else; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    advance = progress or (lambda n: None)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "annotations").mkdir()
        _write_split(spec, "train", spec.train_images, staging, advance)
        _write_split(spec, "val", spec.val_images, staging, advance)
        with open(staging / META_FILE, "w") as f:
            json.dump(meta, f, indent=2)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return True

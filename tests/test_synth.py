"""The synthetic COCO-format dataset: determinism, validity, variety, and its loaders."""
import hashlib
import json

import numpy as np
import pytest

from akd_cli import synth

SMALL = synth.SynthSpec(train_images=12, val_images=4, image_size=96, num_classes=5, seed=3)


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    assert synth.generate(SMALL, root)
    return root


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    again = tmp_path / "again"
    synth.generate(SMALL, again)
    assert tree_digest(again) == tree_digest(dataset)
    other = synth.render_image(synth.SynthSpec(**{**SMALL.__dict__, "seed": 4}), "train", 0)[0]
    assert not np.array_equal(other, synth.render_image(SMALL, "train", 0)[0])


def test_a_larger_dataset_extends_a_smaller_one():
    bigger = synth.SynthSpec(**{**SMALL.__dict__, "train_images": 50})
    for index in (0, 11):
        assert np.array_equal(synth.render_image(bigger, "train", index)[0],
                              synth.render_image(SMALL, "train", index)[0])


def test_annotations_load_through_pycocotools(dataset):
    from pycocotools.coco import COCO

    for split, count in (("train", 12), ("val", 4)):
        coco = COCO(str(dataset / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synth.SHAPES)[:5]
        anns = coco.loadAnns(coco.getAnnIds())
        assert anns, "every split has objects"
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"]
            ys, xs = np.nonzero(mask)  # the box is the tight box of the visible mask
            assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == ann["bbox"]


def test_objects_vary_in_class_scale_and_aspect_and_occlude_each_other():
    spec = synth.SynthSpec(train_images=60, val_images=1, image_size=128, num_classes=6, seed=0)
    categories, sides, aspects, occluded = set(), [], [], 0
    for index in range(60):
        _, objects = synth.render_image(spec, "train", index)
        for obj in objects:
            ys, xs = np.nonzero(obj["mask"])
            w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            categories.add(obj["category"])
            sides.append(max(w, h))
            aspects.append(w / h)
            # an occluded object's visible mask fills its box less than its shape would alone
        occluded += sum(1 for a in objects for b in objects if a is not b and _touching(a["mask"], b["mask"]))
    assert categories == set(range(6))
    assert max(sides) > 3 * min(sides)
    assert min(aspects) < 0.7 and max(aspects) > 1.4
    assert occluded > 0


def _touching(a, b):
    grown = a.copy()
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())


def test_existing_dataset_is_kept_and_other_content_protected(dataset, tmp_path):
    assert synth.generate(SMALL, dataset) is False  # already there: nothing written
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        synth.generate(SMALL, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".precious.")], "no staging left behind"


@pytest.mark.parametrize("field, value", [("image_size", 16), ("num_classes", 0),
                                          ("num_classes", synth.MAX_CLASSES + 1), ("train_images", 0)])
def test_out_of_range_specs_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        synth.SynthSpec(**{**SMALL.__dict__, field: value}).validate()


def test_annotations_load_through_mmdet_coco_dataset(dataset):
    pytest.importorskip("mmdet")
    from mmdet.datasets import build_dataset

    classes = tuple(synth.SHAPES)[:5]
    ds = build_dataset(dict(
        type="CocoDataset", classes=classes, ann_file=str(dataset / "annotations" / "instances_train.json"),
        img_prefix=str(dataset / "train") + "/",
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                  dict(type="Resize", img_scale=(96, 96), keep_ratio=True), dict(type="RandomFlip", flip_ratio=0.0),
                  dict(type="Normalize", mean=[0, 0, 0], std=[1, 1, 1], to_rgb=True),
                  dict(type="Pad", size_divisor=32), dict(type="DefaultFormatBundle"),
                  dict(type="Collect", keys=["img", "gt_bboxes", "gt_labels"])]))
    assert ds.CLASSES == classes
    sample = ds[0]
    assert sample["img"].data.shape == (3, 96, 96)
    assert sample["gt_bboxes"].data.shape[1] == 4 and len(sample["gt_labels"].data) > 0
    with open(dataset / "annotations" / "instances_train.json") as f:
        assert len(json.load(f)["images"]) == len(ds)

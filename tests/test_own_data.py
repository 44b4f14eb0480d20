"""Issue 13, item 1: a user's own COCO-format dataset, with category ids and names of its own.

The dataset (``conftest.make_own_dataset``): COCO's layout, three categories with ids 3, 7 and 9
named wheel, crate and sail. Configs are checked in-process; the runs are real and short.
"""
import json
from pathlib import Path

import pytest

from conftest import OWN_CATEGORIES, TINY, make_own_dataset, refused, run_akd

NAMES = tuple(name for _, name in OWN_CATEGORIES)


def _prepare(**kwargs):
    from akd_cli.mm.runs import prepare
    from akd_cli.options import TrainOptions

    return prepare(TrainOptions(**kwargs))


def _num_classes(tree):
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "num_classes":
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(tree)
    return found


def test_tiny_preset_takes_categories_names_and_count_from_the_file(own_root):
    run = _prepare(preset=TINY, data_root=str(own_root), teacher_checkpoint="t.pth")
    cfg = run.config
    for split in ("train", "val", "test"):
        assert tuple(cfg.data[split].classes) == NAMES
    assert cfg.data.train.ann_file == f"{own_root}/annotations/instances_train2017.json"
    assert cfg.data.val.img_prefix == f"{own_root}/val2017/"
    assert _num_classes(cfg.model.student) == [3] and _num_classes(cfg.model.teacher) == [3]
    assert any("3 categories" in note and "3 wheel, 7 crate, 9 sail" in note for note in run.notes)
    assert tuple(run.student_config.data.train.classes) == NAMES


@pytest.mark.parametrize("preset", ["retinanet-r101-r50", "cascade-mask-rcnn-x101-faster-rcnn-r50"])
def test_full_presets_take_own_data_in_either_layout(own_root, synth_root, preset):
    cfg = _prepare(preset=preset, data_root=str(own_root)).config
    train = cfg.data.train.get("dataset", cfg.data.train)
    assert tuple(train.classes) == NAMES and train.ann_file.endswith("instances_train2017.json")
    # every class-sized head of both detectors (cascade: three box stages and the mask head)
    assert set(_num_classes(cfg.model.student)) == {3} and set(_num_classes(cfg.model.teacher)) == {3}
    assert len(_num_classes(cfg.model.teacher)) >= (4 if "cascade" in preset else 1)
    synth = _prepare(preset=preset, data_root=str(synth_root)).config
    assert synth.data.val.ann_file == f"{synth_root}/annotations/instances_val.json"
    assert set(_num_classes(synth.model.student)) == {6}


def test_a_directory_that_is_no_dataset_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    message = refused("config", "--preset", TINY, "--method", "none", "--data-root", tmp_path / "empty")
    assert "instances_train2017.json" in message and "instances_train.json" in message
    assert "not found" in refused("config", "--preset", TINY, "--method", "none", "--data-root", tmp_path / "nothing")


@pytest.fixture(scope="module")
def own_teacher(own_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("own-teacher")
    result = run_akd("train", "--preset", TINY, "--train-teacher", "--data-root", own_root, "--work-dir", work,
                     "--epochs", 10, "--batch-size", 4, "--no-validate", cwd=work)
    assert "3 categories" in result.stdout
    return work


def test_eval_on_own_data_equals_pycocotools_with_the_files_ids(own_root, own_teacher, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dump = tmp_path / "dets.json"
    run_akd("eval", own_teacher / "student.pth", "--data-root", own_root, "--dump", dump, "--out", tmp_path / "m.json")
    detections = json.loads(dump.read_text())
    assert detections and {d["category_id"] for d in detections} <= {3, 7, 9}
    gt = COCO(str(own_root / "annotations" / "instances_val2017.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(dump)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    ours = json.loads((tmp_path / "m.json").read_text())["metrics"]
    for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert ours[name] == pytest.approx(evaluator.stats[i], abs=1e-6), name
    assert ours["AP50"] > 0  # the teacher learnt the relabelled shapes: the comparison is not of zeros


def test_distilling_on_own_data_with_its_own_teacher(own_root, own_teacher, tmp_path):
    result = run_akd("train", "--preset", TINY, "--data-root", own_root, "--teacher-checkpoint",
                     own_teacher / "student.pth", "--work-dir", tmp_path, "--epochs", 1, "--batch-size", 4,
                     "--no-validate", cwd=tmp_path)
    assert "heads sized to 3" in result.stdout
    import torch

    exported = torch.load(tmp_path / "student.pth", weights_only=True)
    assert tuple(exported["meta"]["CLASSES"]) == NAMES
    assert exported["state_dict"]["bbox_head.conv_cls.weight"].shape[0] == 3


def test_a_teacher_of_other_categories_is_refused_saying_how_to_get_one(own_root, teacher_checkpoint, tmp_path):
    message = refused("train", "--preset", TINY, "--data-root", own_root, "--teacher-checkpoint", teacher_checkpoint,
                      "--work-dir", tmp_path / "w")
    assert "trained on 6 categories" in message and "the data has 3" in message and "--train-teacher" in message
    import torch

    state = torch.load(teacher_checkpoint, weights_only=True)
    state["meta"].pop("CLASSES")  # without the names, the head's shape tells
    torch.save(state, tmp_path / "bare.pth")
    message = refused("train", "--preset", TINY, "--data-root", own_root, "--teacher-checkpoint", tmp_path / "bare.pth",
                      "--work-dir", tmp_path / "w")
    assert "bbox_head.conv_cls.weight (6, 128, 3, 3) vs (3, 128, 3, 3)" in message and "--train-teacher" in message
    assert not (tmp_path / "w" / "config.py").exists()


# --- data checks before a run starts ---------------------------------------------------------------

@pytest.fixture()
def damaged(tmp_path):
    """A fresh copy of a small own dataset to damage."""
    return make_own_dataset(tmp_path / "data", train_images=6, val_images=3, seed=11)


def _edit(root: Path, split: str, change) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


def _teacher_run(root, work, *extra, check=True):
    return run_akd("train", "--preset", TINY, "--train-teacher", "--data-root", root, "--work-dir", work,
                   "--epochs", 1, "--batch-size", 6, *extra, cwd=work.parent, check=check)


def test_boxes_of_non_positive_size_are_counted_and_dropped(damaged, tmp_path):
    def degenerate(coco):
        coco["annotations"][0]["bbox"][2] = -4.0
        coco["annotations"][1]["bbox"][3] = 0
    _edit(damaged, "train", degenerate)
    total = len(json.loads((damaged / "annotations" / "instances_train2017.json").read_text())["annotations"])
    result = _teacher_run(damaged, tmp_path / "w", "--no-validate")
    assert f"train: 2 of {total} boxes of non-positive size" in " ".join(result.stdout.split())
    assert (tmp_path / "w" / "student.pth").is_file()


def test_images_the_disk_lacks_are_refused_with_a_count(damaged, tmp_path):
    for name in ("000001.png", "000002.png"):
        (damaged / "val2017" / name).unlink()
    message = refused("train", "--preset", TINY, "--train-teacher", "--data-root", damaged, "--work-dir", tmp_path / "w")
    assert "2 of 3 val images" in message and "000001.png" in message


@pytest.mark.parametrize("change, expected", [
    (lambda c: c.update(images=[], annotations=[]), "the val split is empty"),
    (lambda c: [a.pop("area") for a in c["annotations"]], "lacks one of image_id, bbox, category_id, area"),
    (lambda c: c.update(categories=c["categories"][:2]), "categories differ"),
    (lambda c: c["categories"][1].update(name="wheel"), "category names must be unique"),
])
def test_bad_annotations_are_refused_before_the_run(damaged, tmp_path, change, expected):
    _edit(damaged, "val", change)
    assert expected in refused("train", "--preset", TINY, "--train-teacher", "--data-root", damaged,
                               "--work-dir", tmp_path / "w")
    assert not (tmp_path / "w" / "config.py").exists()


def test_a_train_split_without_boxes_is_refused(damaged, tmp_path):
    _edit(damaged, "train", lambda c: c.update(annotations=[]))
    assert "no usable boxes" in refused("train", "--preset", TINY, "--train-teacher", "--data-root", damaged,
                                        "--work-dir", tmp_path / "w", "--no-validate")


def test_no_detections_score_as_pycocotools_scores_them(own_root, tmp_path):
    """An empty result list: AP 0 where there is ground truth, -1 for a size range without any
    (pycocotools' convention), not 0 everywhere."""
    from types import SimpleNamespace

    from pycocotools.coco import COCO

    from akd_cli.mm.evaluate import coco_metrics

    gt = COCO(str(own_root / "annotations" / "instances_val2017.json"))
    (tmp_path / "none.json").write_text("[]")
    metrics = coco_metrics(SimpleNamespace(coco=gt, cat_ids=gt.getCatIds(), img_ids=gt.getImgIds()),
                           str(tmp_path / "none.json"))
    areas = [a["area"] for a in gt.dataset["annotations"]]
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0
    assert metrics["APl"] == (0.0 if any(a > 96 ** 2 for a in areas) else -1.0)
    assert metrics["APs"] == (0.0 if any(a < 32 ** 2 for a in areas) else -1.0)

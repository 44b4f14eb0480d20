"""`akd visualize` on a trained student and teacher, and a small `akd demo` (twice: reproducible)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, refused, run_akd

pytestmark = pytest.mark.slow


def test_visualize_writes_a_panel_per_level_and_the_detections(akd_run, teacher_checkpoint, synth_root, tmp_path):
    work, _ = akd_run
    image = synth_root / "val" / "000001.png"
    result = run_akd("visualize", "--preset", TINY, "--checkpoint", work / "student.pth", "--teacher-checkpoint",
                     teacher_checkpoint, "--image", image, "--out", tmp_path / "vis", "--avatars", 3, cwd=tmp_path)
    assert "wrote 7 image(s)" in result.stdout
    names = sorted(p.name for p in (tmp_path / "vis").iterdir())
    assert names == ["detections_student.png", "detections_teacher.png"] + [f"fpn_level{i}.png" for i in range(5)]
    panel = np.asarray(Image.open(tmp_path / "vis" / "fpn_level0.png").convert("RGB"))
    # six panels (teacher, 3 Avatars, spread, student) side by side: wider than tall, and not blank
    assert panel.shape[1] > 4 * panel.shape[0] and panel.std() > 10


def test_visualize_refusals(akd_run, teacher_checkpoint, synth_root, tmp_path):
    work, _ = akd_run
    image = synth_root / "val" / "000001.png"
    base = ["visualize", "--preset", TINY, "--teacher-checkpoint", teacher_checkpoint, "--out", tmp_path / "v"]
    assert "image not found" in refused(*base, "--checkpoint", work / "student.pth", "--image", tmp_path / "x.png",
                                        cwd=tmp_path)
    message = refused(*base, "--checkpoint", teacher_checkpoint, "--image", image, cwd=tmp_path)
    assert "does not fit the student model" in message and "shape mismatch" in message
    assert "has levels 0..4" in refused(*base, "--checkpoint", work / "student.pth", "--image", image,
                                        "--levels", "7", cwd=tmp_path)


def small_demo(out):
    return run_akd("demo", "--out", out, "--train-images", 16, "--val-images", 8, "--teacher-epochs", 1,
                   "--student-epochs", 1, cwd=out.parent, timeout=900)


def metrics(out):
    return {role: json.loads((out / role / "metrics.json").read_text())["metrics"]
            for role in ROLES}


ROLES = ("teacher", "baseline", "kd", "akd", "akd-paper")


def test_small_demo_runs_end_to_end_and_is_reproducible(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    result = small_demo(first)
    for stage in ("[1/7] synthetic dataset", "[2/7] teacher", "no distillation", "the release's factor",
                  "the paper's sigma", "[7/7] table"):
        assert stage in result.stdout
    table = (first / "RESULTS.md").read_text()
    assert "<!-- akd-table:start -->" in table and "| FCOS-R18 (tiny) | FCOS-R34 (tiny) | CWD, 1 Avatar |" in table
    assert "AvatarKD, paper's sigma" in table
    records = {role: json.loads((first / role / "metrics.json").read_text()) for role in ROLES}
    assert {role: r["role"] for role, r in records.items()} == {role: role for role in ROLES}
    assert (records["akd"]["uncertainty"], records["akd-paper"]["uncertainty"]) == ("release", "paper")
    teacher = torch.load(first / "teacher" / "student.pth", weights_only=True)["state_dict"]
    distilled = torch.load(first / "akd" / "latest.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(distilled[f"teacher.{k}"], v) for k, v in teacher.items())

    assert "pass --force" in refused("demo", "--out", first, cwd=tmp_path)
    small_demo(second)
    assert metrics(first) == metrics(second)

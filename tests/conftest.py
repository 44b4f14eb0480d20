"""Shared fixtures: a small synthetic dataset and a briefly trained tiny teacher, made once per session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = "tiny-fcos-r34-r18"

if os.environ.get("AKD_TRITON_INTERPRET") == "1":  # a child of tests/test_triton_interpret.py
    import triton_interpret

    triton_interpret.enable()


def child_env(**extra) -> dict:
    """The environment for a child process: os.environ without COLUMNS and LINES (readline, which
    pytest loads, exports COLUMNS=80 behind os.environ's back, and the child would take it for a
    user's setting), unbuffered, with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run_akd(*args, cwd=None, timeout=600, env=None, check=True):
    """`akd ARGS` in a subprocess (environment: ``child_env``); returns the CompletedProcess
    (stdout and stderr as text)."""
    result = subprocess.run([sys.executable, "-m", "akd_cli.cli", *map(str, args)], cwd=cwd, env=child_env(**(env or {})),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"akd {' '.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def refused(*args, cwd=None):
    """`akd ARGS` must fail as bad input does: exit 2, no traceback, one `error:` line last. Returns
    stderr with its whitespace collapsed (rich may wrap the line)."""
    result = run_akd(*args, cwd=cwd, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and (lines[-1].startswith("error:") or "error:" in result.stderr), result.stderr
    return " ".join(result.stderr.split())


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from akd_cli import synth

    root = tmp_path_factory.mktemp("data") / "synth"
    synth.generate(synth.SynthSpec(train_images=16, val_images=8, image_size=128, num_classes=6, seed=0), root)
    return root


OWN_CATEGORIES = ((3, "wheel"), (7, "crate"), (9, "sail"))


def make_own_dataset(root: Path, train_images=12, val_images=6, seed=5) -> Path:
    """A COCO-layout dataset of its own (annotations/instances_{train,val}2017.json, train2017/,
    val2017/) whose three categories have non-contiguous ids (3, 7, 9) and names no preset knows:
    synthetic shapes, relabelled."""
    import json
    import shutil

    from akd_cli import synth

    source = root.parent / f".{root.name}-source"
    synth.generate(synth.SynthSpec(train_images=train_images, val_images=val_images, image_size=128,
                                   num_classes=3, seed=seed), source)
    (root / "annotations").mkdir(parents=True)
    ids = {i + 1: cat_id for i, (cat_id, _) in enumerate(OWN_CATEGORIES)}
    for split in ("train", "val"):
        shutil.copytree(source / split, root / f"{split}2017")
        coco = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        coco["categories"] = [{"id": cat_id, "name": name, "supercategory": "thing"} for cat_id, name in OWN_CATEGORIES]
        for ann in coco["annotations"]:
            ann["category_id"] = ids[ann["category_id"]]
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    shutil.rmtree(source)
    return root


@pytest.fixture(scope="session")
def own_root(tmp_path_factory):
    return make_own_dataset(tmp_path_factory.mktemp("own") / "coco")


@pytest.fixture(scope="session")
def teacher_run(synth_root, tmp_path_factory):
    """The tiny teacher trained alone for 32 iterations: enough to detect something (AP > 0)."""
    work = tmp_path_factory.mktemp("teacher")
    run_akd("train", "--preset", TINY, "--train-teacher", "--data-root", synth_root, "--work-dir", work,
            "--epochs", "8", "--batch-size", "4", "--no-validate", cwd=work)
    return work


@pytest.fixture(scope="session")
def teacher_checkpoint(teacher_run):
    return teacher_run / "student.pth"


@pytest.fixture(scope="session")
def akd_run(synth_root, teacher_checkpoint, tmp_path_factory):
    """One epoch of AKD (CWD, 2 Avatars) on one worker: (work dir, CompletedProcess)."""
    work = tmp_path_factory.mktemp("akd-run")
    result = run_akd("train", "--preset", TINY, "--data-root", synth_root, "--work-dir", work, "--epochs", 1,
                     "--batch-size", 4, "--cfg-options", "log_config.interval=1",
                     "--teacher-checkpoint", teacher_checkpoint, "--num-avatars", 2, cwd=work)
    return work, result

"""The command line: instant help, version, one-line errors, and `akd data synth`."""
import json
import subprocess
import sys

import pytest

from akd_cli import __version__

from conftest import refused, run_akd


def test_help_lists_the_commands_without_importing_torch_or_mmdet():
    code = ("import sys\nfrom akd_cli.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('\\nHEAVY', sorted(m for m in ('torch', 'mmcv', 'mmdet', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    for command in ("train", "eval", "visualize", "table", "data", "presets", "demo"):
        assert f" {command} " in out, f"{command} missing from --help"
    assert out.strip().endswith("HEAVY []")


def test_version():
    assert run_akd("--version").stdout.strip() == f"akd {__version__}"


def test_presets_lists_filters_and_prints_whole_cells_when_piped():
    listed = run_akd("presets").stdout
    assert "cascade-mask-rcnn-x101-faster-rcnn-r50" in listed and "Cascade Mask RCNN-X101" in listed
    assert "\u2026" not in listed, "cells were cut to fit 80 columns"
    tiny = run_akd("presets", "--tiny").stdout
    assert "tiny-fcos-r34-r18" in tiny and "reppoints" not in tiny
    full = run_akd("presets", "rcnn", "--full").stdout
    assert "faster-rcnn-r101-r50" in full and "fcos" not in full and "tiny" not in full
    assert "no preset matches 'yolo'" in refused("presets", "yolo")


def test_data_synth_writes_a_dataset_then_finds_it_there(tmp_path):
    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--train-images", "6", "--val-images", "2",
            "--image-size", "64", "--classes", "3"]
    first = run_akd(*args)
    assert "wrote 6 train + 2 val images" in first.stdout
    with open(out / "annotations" / "instances_val.json") as f:
        assert [c["name"] for c in json.load(f)["categories"]] == ["disc", "box", "triangle"]
    assert "nothing to do" in run_akd(*args).stdout


@pytest.mark.parametrize("args, message", [
    (["--classes", "99"], "--classes must be at most 10"),
    (["--image-size", "8"], "Invalid value for '--image-size'"),
    (["--train-images", "-1"], "Invalid value for '--train-images'"),
    (["--colours", "3"], "No such option: --colours"),
])
def test_bad_options_give_a_one_line_error_and_exit_2(tmp_path, args, message):
    assert message in refused("data", "synth", "--out", str(tmp_path / "x"), *args)


def test_synth_refuses_to_overwrite_other_content(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    assert "--force" in refused("data", "synth", "--out", str(tmp_path), "--train-images", "2", "--val-images", "1")
    assert (tmp_path / "keep.txt").read_text() == "mine"

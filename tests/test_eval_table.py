"""`akd eval` against mmdet's own test path and pycocotools, and `akd table` on the results."""
import contextlib
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, refused, run_akd

pytestmark = pytest.mark.slow
ALL_SCORES = ["--cfg-options", "model.student.test_cfg.score_thr=0.0"]  # an untrained model still detects


@pytest.fixture(scope="module")
def evaluated(teacher_run, tmp_path_factory):
    """The teacher run's exported checkpoint, evaluated with its work dir's config: (work, record, dump)."""
    dump = tmp_path_factory.mktemp("eval") / "detections.json"
    run_akd("eval", teacher_run / "student.pth", "--dump", dump, *ALL_SCORES, cwd=teacher_run)
    return teacher_run, json.loads((teacher_run / "metrics.json").read_text()), dump


def test_metrics_json_records_what_was_evaluated(evaluated):
    work, record, _ = evaluated
    assert record["preset"] == TINY and record["role"] == "teacher" and record["method"] is None
    assert record["checkpoint_sha256"] == hashlib.sha256((work / "student.pth").read_bytes()).hexdigest()
    assert record["dataset"]["images"] == 8 and record["dataset"]["ann_file"].endswith("instances_val.json")
    assert set(record["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert record["akd_version"] and record["date"]


def test_a_distilled_students_metrics_name_its_method(akd_run, synth_root, tmp_path):
    work, _ = akd_run
    run_akd("eval", work / "student.pth", "--data-root", synth_root, "--out", tmp_path / "m.json", cwd=work)
    record = json.loads((tmp_path / "m.json").read_text())
    assert (record["role"], record["method"], record["num_avatars"]) == ("akd", "cwd", 2)


def test_map_equals_pycocotools_on_the_dumped_detections(evaluated, synth_root):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _, record, dump = evaluated
    detections = json.loads(dump.read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(synth_root / "annotations" / "instances_val.json"))
        evaluator = COCOeval(gt, gt.loadRes(str(dump)), "bbox")  # pycocotools' own defaults
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert record["metrics"]["AP"] > 0, "the check is only meaningful with detections that score"
    for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm")):
        assert record["metrics"][name] == pytest.approx(evaluator.stats[i], abs=1e-12)


def test_map_equals_mmdets_own_test_path(evaluated):
    import mmdet

    work, record, _ = evaluated
    tool = Path(mmdet.__file__).parent / ".mim" / "tools" / "test.py"
    result = subprocess.run([sys.executable, str(tool), str(work / "student_config.py"), str(work / "student.pth"),
                             "--eval", "bbox", "--cfg-options", "model.test_cfg.score_thr=0.0"],
                            cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    # mmdet prints an OrderedDict: ('bbox_mAP', 0.123), ...
    reported = {m.group(1): float(m.group(2))
                for m in re.finditer(r"'bbox_(mAP(?:_50|_75|_s|_m)?)'[,:] ([-\d.]+)", result.stdout)}
    ours = record["metrics"]
    assert reported["mAP"] == round(ours["AP"], 4) and reported["mAP_50"] == round(ours["AP50"], 4)
    assert reported["mAP_75"] == round(ours["AP75"], 4) and reported["mAP_s"] == round(ours["APs"], 4)


def test_full_checkpoint_evaluates_its_student(evaluated, tmp_path):
    work, record, _ = evaluated
    run_akd("eval", work / "latest.pth", "--out", tmp_path / "m.json", *ALL_SCORES, cwd=work)
    full = json.loads((tmp_path / "m.json").read_text())
    assert full["metrics"] == record["metrics"] and full["role"] == "teacher"


def test_two_workers_give_the_same_map(evaluated, tmp_path):
    work, record, _ = evaluated
    run_akd("eval", work / "student.pth", "--gpus", 2, "--device", "cpu", "--out", tmp_path / "m.json", *ALL_SCORES,
            cwd=work)
    two = json.loads((tmp_path / "m.json").read_text())
    assert two["metrics"] == record["metrics"] and two["workers"] == 2


def test_teacher_checkpoint_is_recognised(teacher_checkpoint, synth_root, tmp_path):
    run_akd("eval", teacher_checkpoint, "--preset", TINY, "--data-root", synth_root, "--out", tmp_path / "m.json",
            cwd=tmp_path)
    assert json.loads((tmp_path / "m.json").read_text())["role"] == "teacher"


def test_eval_refusals(akd_run, synth_root, tmp_path):
    work, _ = akd_run
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"neck.lateral_convs.0.conv.weight": torch.zeros(3)}}, wrong)
    message = refused("eval", wrong, "--preset", TINY, "--data-root", synth_root, cwd=tmp_path)
    assert "does not fit the student model" in message and "missing key(s)" in message
    assert "neck.lateral_convs.0.conv.weight" in message
    assert "checkpoint not found" in refused("eval", tmp_path / "nope.pth", "--preset", TINY, cwd=tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "cannot read checkpoint" in refused("eval", garbage, "--preset", TINY, "--data-root", synth_root, cwd=tmp_path)
    assert "data root not found" in refused("eval", work / "student.pth", "--data-root", tmp_path / "none", cwd=tmp_path)
    assert "pass --preset or --config" in refused("eval", wrong, cwd=tmp_path)
    assert "asked for 2 GPUs" in refused("eval", work / "student.pth", "--gpus", 2, cwd=tmp_path)


# --- akd table ---------------------------------------------------------------------------------

README = """# My project

Some text that must survive.

<!-- akd-table:start -->
old table
<!-- akd-table:end -->

## After

More text.
"""


def test_table_writes_between_the_markers_only_and_is_idempotent(evaluated, tmp_path):
    work, record, _ = evaluated
    readme = tmp_path / "README.md"
    readme.write_text(README)
    run_akd("table", work, "--readme", readme, cwd=tmp_path)
    text = readme.read_text()
    head, rest = text.split("<!-- akd-table:start -->")
    block, tail = rest.split("<!-- akd-table:end -->")
    assert head == README.split("<!-- akd-table:start -->")[0]
    assert tail == README.split("<!-- akd-table:end -->")[1]
    assert "old table" not in block and "**Baseline settings**" in block and "**Stronger teachers**" in block
    ours = f"{100 * record['metrics']['AP']:.1f}"
    assert f"| FCOS-R18 (tiny) | FCOS-R34 (tiny) | CWD, 1 Avatar | - / - | - / {ours} | - / - | - / - |" in block
    # a row whose base loss is MasKD shows MasKD's own published number on the paper side of KD
    assert ("| Faster RCNN-R50 | Faster RCNN-R101 | MasKD, 1 Avatar | 38.4 / - | 39.8 / - | 41.0 (MasKD) / - | "
            "40.9 / - |") in block
    assert "| Faster RCNN-R50 | Cascade Mask RCNN-X101 | MGD, 1 Avatar | 38.4 / - | 45.6 / - | - / - | 42.4 / - |" in block
    second = run_akd("table", work, "--readme", readme, cwd=tmp_path)
    assert "unchanged" in second.stdout and readme.read_text() == text
    assert run_akd("table", work, "--readme", readme, "--check", cwd=tmp_path).returncode == 0


def test_table_check_detects_a_stale_readme_and_writes_nothing(evaluated, tmp_path):
    work, _, _ = evaluated
    readme = tmp_path / "README.md"
    readme.write_text(README)
    result = run_akd("table", work, "--readme", readme, "--check", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "stale" in result.stderr
    assert readme.read_text() == README


def test_table_adds_missing_markers_at_the_end(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nText.\n")
    run_akd("table", "--readme", readme, cwd=tmp_path)
    text = readme.read_text()
    assert text.startswith("# Title\n\nText.\n\n<!-- akd-table:start -->\n") and text.endswith("<!-- akd-table:end -->\n")


def test_table_refuses_broken_markers_and_leaves_the_file_alone(tmp_path):
    readme = tmp_path / "README.md"
    broken = "# T\n<!-- akd-table:end -->\nx\n<!-- akd-table:start -->\n"
    readme.write_text(broken)
    assert "expected one" in refused("table", "--readme", readme, cwd=tmp_path)
    assert readme.read_text() == broken


def test_table_makes_a_missing_readme_but_not_a_missing_directory(tmp_path):
    made = tmp_path / "README.md"
    run_akd("table", "--readme", made, cwd=tmp_path)
    assert made.read_text().startswith("<!-- akd-table:start -->\n")
    typo = tmp_path / "no-such-dir" / "README.md"
    assert "no directory" in refused("table", "--readme", typo, cwd=tmp_path)
    assert not typo.parent.exists()


def test_table_reports_and_skips_corrupt_metrics(evaluated, tmp_path):
    work, record, _ = evaluated
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.json").write_text(json.dumps({"preset": TINY, "role": "akd", "metrics": {"AP": "high"}}))
    result = run_akd("table", work, bad, tmp_path / "odd", tmp_path / "missing", "-f", "json", cwd=tmp_path)
    assert result.stderr.count("warning:") == 3 and "skipped" in result.stderr
    rows = {r["preset"]: r for r in json.loads(result.stdout)}
    assert rows[TINY]["ours"] == {"teacher": pytest.approx(100 * record["metrics"]["AP"], abs=0.01)}
    assert rows["fcos-r101-r50"]["paper"] == {"baseline": 38.5, "teacher": 40.8, "kd": 42.9, "akd": 42.9}
    assert rows["reppoints-x101-r50"]["paper"]["kd"] is None  # its base loss is CWD: no published KD number
    assert rows["fcos-r101-r50"]["ours"] == {}


def test_table_csv(evaluated, tmp_path):
    work, _, _ = evaluated
    lines = run_akd("table", work, "-f", "csv", cwd=tmp_path).stdout.splitlines()
    assert lines[0].startswith("table,preset,student,teacher,method")
    assert len(lines) == 1 + 6 + 1  # header, the paper's six rows, the measured tiny preset

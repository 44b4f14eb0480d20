"""`akd train` for real on the synthetic data: one worker, two gloo workers, two nodes on localhost,
a student baseline, mmdet's own tools on the generated config and on the exported student,
resume after a kill, and the errors that must stop a run before it starts."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, refused, run_akd

pytestmark = pytest.mark.slow


def mmdet_tool(name):
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "tools" / name


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def log_records(work_dir):
    records = []
    for path in sorted(Path(work_dir).glob("*.log.json")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]
    return [r for r in records if "mode" in r]


def train_args(synth_root, work_dir, *extra, epochs=1):
    return ["train", "--preset", TINY, "--data-root", synth_root, "--work-dir", work_dir, "--epochs", epochs,
            "--batch-size", 4, "--cfg-options", "log_config.interval=1", *extra]


def test_one_worker_akd_run_trains_and_logs_the_distillation_loss(akd_run):
    work, result = akd_run
    assert "done: student checkpoint" in result.stdout
    train_logs = [r for r in log_records(work) if r["mode"] == "train"]
    assert train_logs and all(r["loss_akd_cwd_fpn"] > 0 for r in train_logs)
    assert (work / "config.py").is_file() and (work / "student_config.py").is_file()
    assert os.readlink(work / "latest.pth") == "epoch_1.pth"
    assert not list(work.glob("*.partial-*")), "no half-written checkpoint left behind"


def test_console_shows_progress_and_the_log_file_keeps_the_details(akd_run):
    work, result = akd_run
    console = result.stdout + result.stderr
    assert "train epoch 1/1: iteration" in console and "akd_cwd_fpn=" in console  # one line per epoch off a terminal
    for noise in ("loading annotations", "elapsed:", "NormalInit", "initialize ResNet"):
        assert noise not in console, noise
    (log,) = work.glob("*.log")
    assert "initialize ResNet" in log.read_text()  # mmcv's init report goes to the run's log, not nowhere


def test_teacher_is_frozen_and_absent_from_the_optimizer(akd_run, teacher_checkpoint):
    work, _ = akd_run
    full = load(work / "latest.pth")
    teacher = {k[len("teacher."):]: v for k, v in full["state_dict"].items() if k.startswith("teacher.")}
    original = load(teacher_checkpoint)["state_dict"]
    assert teacher.keys() == original.keys()
    assert all(torch.equal(teacher[k], original[k]) for k in original), "teacher weights changed"
    trainable = sum(1 for k in full["state_dict"] if not k.startswith("teacher.")
                    and "running_" not in k and "num_batches_tracked" not in k)
    optimised = sum(len(g["params"]) for g in full["optimizer"]["param_groups"])
    assert optimised == trainable  # every trainable tensor of student, align convs and losses; no teacher


def test_exported_student_is_a_plain_mmdet_checkpoint(akd_run):
    work, _ = akd_run
    student = load(work / "student.pth")
    assert set(student) == {"meta", "state_dict"}
    assert not any(k.startswith(("student.", "teacher.", "akd_losses.", "align.")) for k in student["state_dict"])
    assert student["meta"]["CLASSES"][:2] == ("disc", "box")


def test_exported_student_evaluates_in_mmdets_own_test_tool(akd_run):
    work, _ = akd_run
    result = subprocess.run([sys.executable, str(mmdet_tool("test.py")), str(work / "student_config.py"),
                             str(work / "student.pth"), "--eval", "bbox"], cwd=work, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Evaluating bbox" in output
    assert "missing keys" not in output and "unexpected key" not in output
    assert "akd_cli" not in (work / "student_config.py").read_text()


def test_generated_config_runs_in_mmdets_own_train_tool(akd_run, tmp_path):
    work, _ = akd_run
    result = subprocess.run([sys.executable, str(mmdet_tool("train.py")), str(work / "config.py"),
                             "--work-dir", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "epoch_1.pth").is_file()
    assert any("loss_akd_cwd_fpn" in r for r in log_records(tmp_path))


def test_two_gloo_workers_train_and_evaluate(synth_root, teacher_checkpoint, tmp_path):
    result = run_akd(*train_args(synth_root, tmp_path, "--teacher-checkpoint", teacher_checkpoint,
                                 "--gpus", 2, "--device", "cpu"), cwd=tmp_path)
    assert "done: student checkpoint" in result.stdout
    records = log_records(tmp_path)
    assert any(r["mode"] == "train" and "loss_akd_cwd_fpn" in r for r in records)
    assert any(r["mode"] == "val" for r in records), "distributed evaluation ran"
    assert "2 worker(s) on cpu" in "".join(p.read_text() for p in tmp_path.glob("*.log"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(synth_root, teacher_checkpoint, tmp_path):
    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        args = train_args(synth_root, tmp_path / f"node{node_rank}", "--teacher-checkpoint", teacher_checkpoint,
                          "--nnodes", 2, "--node-rank", node_rank, "--master-addr", "127.0.0.1",
                          "--master-port", port, "--device", "cpu", "--no-validate")
        nodes.append(subprocess.Popen([sys.executable, "-m", "akd_cli.cli", *map(str, args)], cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert (tmp_path / "node0" / "student.pth").is_file()
    assert "2 worker(s) on cpu" in "".join(p.read_text() for p in (tmp_path / "node0").glob("*.log"))


def test_student_baseline_needs_no_teacher(synth_root, tmp_path):
    result = run_akd(*train_args(synth_root, tmp_path, "--method", "none", "--no-validate"), cwd=tmp_path)
    assert "done" in result.stdout
    full = load(tmp_path / "latest.pth")
    assert not any(k.startswith("teacher.") for k in full["state_dict"])
    assert not any("loss_akd" in r for r in log_records(tmp_path))


def test_resume_after_a_killed_run_reaches_the_final_epoch(synth_root, teacher_checkpoint, tmp_path):
    args = train_args(synth_root, tmp_path, "--teacher-checkpoint", teacher_checkpoint, "--no-validate", epochs=3)
    process = subprocess.Popen([sys.executable, "-m", "akd_cli.cli", *map(str, args)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(6000):  # poll for the first checkpoint (bounded: never hang the suite)
        if (tmp_path / "epoch_1.pth").exists() or process.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / "epoch_1.pth").exists() and not (tmp_path / "epoch_3.pth").exists()
    load(tmp_path / "latest.pth")  # whatever the kill interrupted, the latest checkpoint is whole

    assert "--resume" in refused(*args, cwd=tmp_path)

    resumed = run_akd(*args, "--resume", cwd=tmp_path)
    assert "done" in resumed.stdout
    assert load(tmp_path / "latest.pth")["meta"]["epoch"] == 3
    log_text = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert re.search(r"resumed epoch [12], iter", log_text)
    assert not list(tmp_path.glob("*.partial-*"))


# --- refused before anything starts -----------------------------------------------------------

def test_maskd_tokens_are_learnt_on_the_teacher_then_distilled_through(synth_root, teacher_checkpoint, tmp_path):
    tokens_dir, student_dir = tmp_path / "tokens", tmp_path / "student"
    learnt = run_akd("train", "--preset", TINY, "--data-root", synth_root, "--work-dir", tokens_dir, "--learn-tokens",
                     "--iters", 4, "--batch-size", 4, "--teacher-checkpoint", teacher_checkpoint, cwd=tmp_path)
    assert f"--token-file {tokens_dir / 'tokens.pth'}" in " ".join(learnt.stdout.split())
    records = [r for r in log_records(tokens_dir) if r["mode"] == "train"]
    assert records and all(0.0 < r["loss_token_overlap"] <= 5.0 and r["loss_cls"] > 0 for r in records)
    tokens = load(tokens_dir / "tokens.pth")["state_dict"]
    full = load(tokens_dir / "iter_4.pth")["state_dict"]
    assert sorted(tokens) == sorted(k for k in full if k.startswith("mask_modules."))
    assert len({k.split(".")[1] for k in tokens}) == 5, "one set of tokens per FPN level"
    assert all(torch.equal(v, full[k]) for k, v in tokens.items())
    teacher = load(teacher_checkpoint)["state_dict"]
    assert all(torch.equal(full[f"detector.{k}"], v) for k, v in teacher.items()), "the teacher stays as it was"

    run_akd(*train_args(synth_root, student_dir, "--method", "maskd", "--token-file", tokens_dir / "tokens.pth",
                        "--teacher-checkpoint", teacher_checkpoint, "--no-validate"), cwd=tmp_path)
    assert all(r["loss_akd_maskd_fpn"] > 0 for r in log_records(student_dir) if r["mode"] == "train")
    distiller = load(student_dir / "latest.pth")["state_dict"]
    level = "akd_losses.fpn.base_losses.2.tokens.mask_token"
    assert torch.equal(distiller[level], tokens["mask_modules.2.mask_token"]), "the learnt tokens, kept fixed"


@pytest.mark.parametrize("args, message", [
    (["--method", "cwd", "--tokens", "t.pth"], "receptive tokens are for the MasKD base loss"),
    (["--method", "maskd", "--tokens", "missing.pth"], "MasKD token file not found: missing.pth"),
    (["--learn-tokens", "--train-teacher"], "different runs"),
    (["--iters", "5"], "--iters sets the length of --learn-tokens"),
])
def test_token_options_that_cannot_work_are_refused(synth_root, teacher_checkpoint, tmp_path, args, message):
    (tmp_path / "t.pth").write_bytes(b"")
    full = train_args(synth_root, tmp_path / "w", "--teacher-checkpoint", teacher_checkpoint, *args)
    assert message in refused(*full, cwd=tmp_path)


def test_more_gpus_than_present_is_refused_before_anything_starts(synth_root, tmp_path):
    from akd_cli.mm.launch import cuda_device_count

    here = cuda_device_count()
    message = refused(*train_args(synth_root, tmp_path / "w", "--method", "none", "--gpus", here + 4), cwd=tmp_path)
    expected = f"asked for {here + 4} GPU(s) but this machine has {here}" if here else \
        "asked for 4 GPUs but this machine has none"
    assert expected in message
    assert not (tmp_path / "w").exists()


def test_missing_data_names_the_file_and_the_fix(tmp_path):
    message = refused(*train_args(tmp_path / "nowhere", tmp_path / "w", "--method", "none"), cwd=tmp_path)
    assert "data root not found" in message and "akd data synth --out" in message


def test_corrupt_annotations_are_reported_in_one_line(synth_root, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(synth_root, broken)
    (broken / "annotations" / "instances_train.json").write_text('{"images": [')
    message = refused(*train_args(broken, tmp_path / "w", "--method", "none"), cwd=tmp_path)
    assert "instances_train.json is not valid JSON" in message


def test_a_teacher_checkpoint_that_does_not_fit_names_the_keys(synth_root, tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, wrong)
    message = refused(*train_args(synth_root, tmp_path / "w", "--teacher-checkpoint", wrong), cwd=tmp_path)
    assert "does not fit the teacher model" in message and "missing key(s)" in message
    assert "backbone.conv1.weight" in message


def test_missing_teacher_checkpoint_and_unsafe_checkpoints(synth_root, tmp_path):
    assert "teacher checkpoint not found" in refused(
        *train_args(synth_root, tmp_path / "w", "--teacher-checkpoint", tmp_path / "none.pth"), cwd=tmp_path)
    assert "has no teacher checkpoint" in refused(*train_args(synth_root, tmp_path / "w"), cwd=tmp_path)
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": {}, "meta": {"thing": _Opaque()}}, pickled)
    message = refused(*train_args(synth_root, tmp_path / "w", "--teacher-checkpoint", pickled), cwd=tmp_path)
    assert "can only be loaded by running pickled code" in message and "--trust-checkpoint" in message


class _Opaque:
    pass


@pytest.mark.parametrize("args, message", [
    (["--num-avatars", "-1"], "Invalid value for '--num-avatars'"),
    (["--drop-rate", "1.0"], "Invalid value for '--drop-rate'"),
    (["--gpus", "0"], "Invalid value for '--gpus'"),
    (["--method", "kd"], "'kd' is not one of 'cwd', 'mgd', 'maskd', 'fgd', 'pkd', 'mse', 'none'"),
    (["--uncertainty", "entropy"], "Invalid value for '--uncertainty'"),
    (["--partition", "gpu"], "--partition is a Slurm option"),
    pytest.param(["--amp", "--method", "none"], "--amp needs CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --amp is valid")),
])
def test_out_of_range_options(synth_root, tmp_path, args, message):
    assert message in refused(*train_args(synth_root, tmp_path / "w", *args), cwd=tmp_path)


def test_non_finite_loss_stops_the_run_with_a_clear_message():
    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from akd_cli.presets import load_preset
    from mmdet.models import build_detector

    from akd_cli.options import TrainOptions

    model = build_detector(build_config(load_preset(TINY), TrainOptions(preset=TINY, method="none")).model)
    model.forward_train = lambda img, img_metas, **kw: {"loss_cls": torch.tensor(float("nan"), requires_grad=True)}
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(loss_cls, loss\)"):
        model.train_step({"img": torch.zeros(1, 3, 32, 32), "img_metas": [{}]}, None)

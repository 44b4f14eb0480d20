"""One path from the command line to the workers: the name lists agree everywhere, options reach
the workers unchanged (the device above all), and srun's worker command runs a job."""
import json
import os
import subprocess
import sys

import pytest
import torch

from akd_cli import names
from akd_cli.options import EvalOptions, Job, LaunchPlan, TrainOptions

from conftest import TINY, run_akd


def test_every_layer_takes_its_names_from_one_list():
    from akd_cli import AKDLoss, cli, presets
    from akd_cli.core import losses, uncertainty
    from akd_cli.core.avatars import make_avatar

    assert tuple(losses.BASE_LOSSES) == names.BASE_LOSSES
    assert names.METHODS == names.BASE_LOSSES + ("none",)
    for choice, values in ((cli.Method, names.METHODS), (cli.Uncertainty, names.UNCERTAINTY_MODES),
                           (cli.Weighting, names.AVATAR_WEIGHTINGS),
                           (cli.Perturbation, names.PERTURBATIONS), (cli.Device, names.DEVICES),
                           (cli.Launcher, names.LAUNCHERS), (cli.EvalRole, names.EVAL_ROLES),
                           (cli.TableFormat, names.TABLE_FORMATS)):
        assert tuple(c.value for c in choice) == values
    teacher = torch.randn(2, 4, 5, 5)
    for perturbation in names.PERTURBATIONS:
        assert make_avatar(teacher, perturbation, 0.1).shape == teacher.shape
    for weighting in names.AVATAR_WEIGHTINGS:
        assert uncertainty.AvatarWeigher(teacher, weighting)(teacher).shape == (2,)
    for mode in names.UNCERTAINTY_MODES:
        assert torch.isfinite(AKDLoss(base="mse", num_avatars=2, uncertainty=mode)(teacher + 1, teacher))
    preset = presets.load_preset(TINY)
    assert preset.method in names.BASE_LOSSES and preset.uncertainty in names.UNCERTAINTY_MODES
    assert preset.weighting in names.AVATAR_WEIGHTINGS
    # the help of `akd train` offers the very lists
    help_text = run_akd("train", "--help", env={"COLUMNS": "200"}).stdout
    for values in (names.METHODS, names.UNCERTAINTY_MODES, names.AVATAR_WEIGHTINGS, names.PERTURBATIONS,
                   names.DEVICES, names.LAUNCHERS):
        assert "<" + "|".join(values) + ">" in help_text


@pytest.mark.parametrize("make, message", [
    (lambda: TrainOptions(), "give exactly one of --preset or --config"),
    (lambda: TrainOptions(preset=TINY, config="c.py"), "give exactly one of --preset or --config"),
    (lambda: TrainOptions(preset=TINY, method="kd"), "--method must be one of cwd, mgd"),
    (lambda: TrainOptions(preset=TINY, num_avatars=-1), r"--num-avatars must be in \[0, 64\]"),
    (lambda: TrainOptions(preset=TINY, drop_rate=1.0), r"--drop-rate must be in \[0.0, 1.0\)"),
    (lambda: TrainOptions(preset=TINY, kind="tokens", epochs=3), "--learn-tokens makes tokens"),
    (lambda: TrainOptions(preset=TINY, method="none", num_avatars=4),
     r"--num-avatars: this run trains the student without distillation \(--method none\), so it has no Avatars"),
    (lambda: TrainOptions(preset=TINY, kind="teacher", uncertainty="paper", avatar_kernel="compiled"),
     "--uncertainty, --avatar-kernel: this run trains the teacher alone"),
    (lambda: EvalOptions(checkpoint="c.pth", role="student"), "--role must be one of"),
    (lambda: EvalOptions(checkpoint="c.pth", launch=LaunchPlan(launcher="slurm")), "akd eval starts its own workers"),
])
def test_options_are_validated_once_when_made(make, message):
    from akd_cli.errors import UserError

    with pytest.raises(UserError, match=message):
        make()


@pytest.fixture
def a_gpu_machine(monkeypatch):
    """This process as on a machine whose torch sees a GPU (what CUDA asks of mmcv's loggers, answered)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)


def test_device_cpu_is_kept_where_a_gpu_is_present(a_gpu_machine, synth_root, teacher_checkpoint, tmp_path):
    """`akd train --device cpu` and `akd eval --device cpu` on a GPU machine ran on the GPU: the worker
    picked the device again from torch.cuda.is_available()."""
    from akd_cli.mm.evaluate import launch_eval
    from akd_cli.mm.runs import launch_training

    cpu = LaunchPlan(device="cpu")
    student = launch_training(TrainOptions(preset=TINY, data_root=str(synth_root), work_dir=str(tmp_path / "w"),
                                           teacher_checkpoint=str(teacher_checkpoint), epochs=1, batch_size=4,
                                           validate=False, launch=cpu))
    log = "".join(p.read_text() for p in (tmp_path / "w").glob("*.log"))
    assert "1 worker(s) on cpu" in log
    record = launch_eval(EvalOptions(checkpoint=student, launch=cpu))
    assert record["device"] == "cpu" and 0.0 <= record["metrics"]["AP"] <= 1.0


def test_srun_worker_command_runs_a_job_with_its_rank_from_slurm(synth_root, tmp_path):
    """What each Slurm task runs: the worker entry on the job file, ranks from SLURM_* variables."""
    work = tmp_path / "w"
    run_akd("config", "--preset", TINY, "--data-root", synth_root, "--method", "none", "--epochs", 1,
            "--batch-size", 4, "--out", work / "config.py")
    options = TrainOptions(preset=TINY, data_root=str(synth_root), method="none", epochs=1, batch_size=4,
                           validate=False, launch=LaunchPlan(launcher="slurm", device="cpu"))
    job = Job(options=options, config=str(work / "config.py"), work_dir=str(work), device="cpu",
              result_file=str(tmp_path / "result.json"))
    job.write(work / "job.json")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_NNODES="1", SLURM_NODELIST="127.0.0.1",
               CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "akd_cli.mm.worker", str(work / "job.json")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    exported = json.loads((tmp_path / "result.json").read_text())["result"]
    assert exported == str(work / "student.pth") and os.path.isfile(exported)

"""The launcher (rank failures, Slurm) and the distiller's recording of head outputs."""
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from akd_cli.errors import UserError
from akd_cli.mm import launch
from akd_cli.presets import FeatureSpec, load_preset

from conftest import TINY

TESTS = Path(__file__).resolve().parent


def test_a_dying_worker_ends_the_job_and_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    plan = launch.LaunchPlan(nproc_per_node=3, device="cpu")
    with pytest.raises(UserError, match=r"worker rank 1 failed \(exit code 3\); stopped the other workers"):
        launch.run_workers([str(tmp_path)], plan, "cpu", poll_s=0.1, module="fake_worker")
    for rank in (0, 2):
        pid = int((tmp_path / f"rank{rank}.pid").read_text())
        with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running
            os.kill(pid, 0)


def test_worker_environment_follows_torchrun():
    plan = launch.LaunchPlan(nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1")
    env = launch.worker_env(plan, local_rank=2, device="cuda", port=29500)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("6", "2", "8", "4")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "29500")


GPUS_HERE = launch.cuda_device_count()


@pytest.mark.parametrize("plan, message", [
    (launch.LaunchPlan(nproc_per_node=GPUS_HERE + 2, device="cuda"),
     rf"asked for {GPUS_HERE + 2} GPU\(s\) but this machine has {GPUS_HERE}"),
    (launch.LaunchPlan(nnodes=2, node_rank=2), r"--node-rank must be in \[0, 1\]"),
])
def test_impossible_plans_are_refused(plan, message):
    with pytest.raises(UserError, match=message):
        launch.resolve_device(plan)


@pytest.mark.parametrize("options", [
    dict(),
    dict(seed=7, deterministic=True, resume=True, amp=True, validate=False, verbose=True),
    dict(seed=3, validate=True, amp=True),
])
def test_worker_options_cross_the_process_boundary_unchanged(options):
    from akd_cli.mm.train import WorkerOptions, worker_parser

    sent = WorkerOptions(**options)
    received = WorkerOptions.from_args(worker_parser().parse_args(["config.py", "work", *sent.to_argv()]))
    assert received == sent


def test_slurm_task_environment(monkeypatch):
    for key, value in dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NNODES="2",
                           SLURM_NODELIST="gpu-a,gpu-b").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    assert launch.in_slurm_step()
    env = launch.slurm_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert env["MASTER_ADDR"] == "gpu-a" and env["MASTER_PORT"] == "29500"


def test_srun_command_runs_one_task_per_gpu():
    plan = launch.LaunchPlan(nproc_per_node=8, nnodes=2)
    cmd = launch.srun_command(["train", "--preset", "x", "--launcher", "slurm"], plan, "gpu")
    assert cmd[:1] == ["srun"] and "--nodes=2" in cmd and "--ntasks-per-node=8" in cmd and "--ntasks=16" in cmd
    assert "--gres=gpu:8" in cmd and "--partition=gpu" in cmd
    assert cmd[-7:] == ["-m", "akd_cli.cli", "train", "--preset", "x", "--launcher", "slurm"]


def test_shared_head_outputs_are_recorded_once_per_level():
    """FCOS's regression conv is one module called on every level: five calls, five recorded levels."""
    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from mmdet.models import build_detector

    preset = load_preset(TINY)
    preset = replace(preset, features=[FeatureSpec(name="reg", student="bbox_head.conv_reg",
                                                   teacher="bbox_head.conv_reg", channels=[4] * 5)])
    model = build_detector(build_config(preset).model)
    model.train()
    img = torch.randn(2, 3, 128, 128)
    metas = [dict(img_shape=(128, 128, 3), ori_shape=(128, 128, 3), pad_shape=(128, 128, 3), scale_factor=1.0,
                  flip=False) for _ in range(2)]
    losses = model.forward_train(img, metas, [torch.tensor([[10.0, 10.0, 60.0, 70.0]])] * 2, [torch.tensor([1])] * 2)
    assert torch.isfinite(losses["loss_akd_cwd_reg"]) and losses["loss_akd_cwd_reg"] > 0
    levels = model.teacher_recorder.levels("bbox_head.conv_reg")
    assert [tuple(t.shape[-2:]) for t in levels] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_unknown_module_names_are_reported():
    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from mmdet.models import build_detector

    preset = replace(load_preset(TINY), features=[FeatureSpec(name="x", student="nek", teacher="neck", channels=[128] * 5)])
    with pytest.raises(UserError, match=r"student has no module 'nek'; did you mean neck"):
        build_detector(build_config(preset).model)

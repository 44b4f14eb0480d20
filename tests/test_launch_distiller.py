"""The launcher (rank failures, Slurm) and the distiller's recording of head outputs."""
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from akd_cli.errors import UserError
from akd_cli.mm import launch
from akd_cli.options import EvalOptions, Job, LaunchPlan, TrainOptions
from akd_cli.presets import FeatureSpec, load_preset

from conftest import TINY

TESTS = Path(__file__).resolve().parent


def _records(tmp_path):
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}


def test_workers_get_torchruns_variables_from_the_elastic_agent(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = dict(os.environ)
    launch.run_workers([str(tmp_path), "ok"], LaunchPlan(nproc_per_node=3, device="cpu"), "cpu", poll_s=0.1,
                       module="fake_worker")
    records = _records(tmp_path)
    assert sorted(records) == [0, 1, 2]
    for rank, env in records.items():
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank), "3", "3")
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
        assert env["CUDA_VISIBLE_DEVICES"] == "" and env["AKD_LAUNCHER_PID"] == str(os.getpid())
    assert dict(os.environ) == before, "the launcher's own environment is left as it was"


def test_a_dying_worker_ends_the_job_and_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    plan = LaunchPlan(nproc_per_node=3, device="cpu")
    with pytest.raises(UserError, match=r"worker rank 1 failed \(exit code 3\); stopped the other workers"):
        launch.run_workers([str(tmp_path), "fail"], plan, "cpu", poll_s=0.1, module="fake_worker")
    for rank in (0, 2):
        with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running
            os.kill(_records(tmp_path)[rank]["pid"], 0)


@pytest.mark.parametrize("target", ["launcher", "process group"])
def test_workers_end_when_their_launcher_is_killed(tmp_path, target):
    """kill -9 of `akd train` (or of its process group) must not leave workers writing checkpoints."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys; from akd_cli.mm import launch; "
            "from akd_cli.options import LaunchPlan; "
            "launch.run_workers([sys.argv[1], 'wait'], LaunchPlan(nproc_per_node=2, device='cpu'), 'cpu', "
            "module='fake_worker')")
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launcher = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                                start_new_session=True)
    deadline = time.time() + 120  # bounds the wait; nothing is asserted about time
    while len(_records(tmp_path)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [r["pid"] for r in _records(tmp_path).values()]
    assert len(pids) == 2, "both workers started"
    if target == "launcher":
        os.kill(launcher.pid, signal.SIGKILL)
    else:
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 10  # bounds the wait for the kernel to reap them; the assertion is on state
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in pids if _running(pid)]
    assert not alive, f"workers {alive} outlived their launcher"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


GPUS_HERE = launch.cuda_device_count()


def test_more_gpus_than_present_are_refused():
    with pytest.raises(UserError, match=rf"asked for {GPUS_HERE + 2} GPU\(s\) but this machine has {GPUS_HERE}"):
        launch.resolve_device(LaunchPlan(nproc_per_node=GPUS_HERE + 2, device="cuda"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(nnodes=2, node_rank=2), r"--node-rank must be in \[0, 1\]"),
    (dict(device="tpu"), "--device must be one of auto, cuda, cpu"),
    (dict(partition="gpu"), "--partition is a Slurm option"),
])
def test_impossible_plans_are_refused_when_made(kwargs, message):
    with pytest.raises(UserError, match=message):
        LaunchPlan(**kwargs)


@pytest.mark.parametrize("options", [
    TrainOptions(preset=TINY),
    TrainOptions(config="my.py", num_avatars=4, drop_rate=0.2, uncertainty="paper", weighting="inverse_variance",
                 perturbation="noise", seed=7,
                 deterministic=True, resume=True, amp=True, validate=False, verbose=True, trust_checkpoint=True,
                 cfg_options={"optimizer.lr": 0.1, "data.samples_per_gpu": 2}, method="mse",
                 launch=LaunchPlan(nproc_per_node=2, nnodes=3, node_rank=1, master_addr="10.0.0.2", master_port=29999,
                                   device="cpu", launcher="slurm", partition="gpu")),
    TrainOptions(preset=TINY, kind="tokens", iters=5),
    EvalOptions(checkpoint="s.pth", preset=TINY, role="akd", dump="d.json", batch_size=2,
                launch=LaunchPlan(nproc_per_node=2, device="cpu")),
])
def test_a_job_crosses_the_process_boundary_unchanged(options, tmp_path):
    job = Job(options=options, config="w/config.py", work_dir="w", device="cpu", result_file="r.json")
    assert Job.read(job.write(tmp_path / "job.json")) == job


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


def test_srun_starts_the_worker_command_once_per_gpu():
    plan = LaunchPlan(nproc_per_node=8, nnodes=2, launcher="slurm", partition="gpu")
    cmd = launch.srun_command("work/job.json", plan)
    assert cmd[:1] == ["srun"] and "--nodes=2" in cmd and "--ntasks-per-node=8" in cmd and "--ntasks=16" in cmd
    assert "--gres=gpu:8" in cmd and "--partition=gpu" in cmd
    assert cmd[-3:] == ["-m", "akd_cli.mm.worker", "work/job.json"], "the worker, not the CLI again"


def test_shared_head_outputs_are_recorded_once_per_level():
    """FCOS's regression conv is one module called on every level: five calls, five recorded levels."""
    import akd_cli.mm.distiller  # noqa: F401
    from akd_cli.mm.config import build_config
    from akd_cli.options import TrainOptions
    from mmdet.models import build_detector

    preset = load_preset(TINY)
    preset = replace(preset, features=[FeatureSpec(name="reg", student="bbox_head.conv_reg",
                                                   teacher="bbox_head.conv_reg", channels=[4] * 5)])
    model = build_detector(build_config(preset, TrainOptions(preset=TINY)).model)
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
    from akd_cli.options import TrainOptions
    from mmdet.models import build_detector

    preset = replace(load_preset(TINY), features=[FeatureSpec(name="x", student="nek", teacher="neck", channels=[128] * 5)])
    with pytest.raises(UserError, match=r"student has no module 'nek'; did you mean neck"):
        build_detector(build_config(preset, TrainOptions(preset=TINY)).model)

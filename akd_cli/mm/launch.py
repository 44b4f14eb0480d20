"""Starting workers: one process, N processes on this machine, several machines, or Slurm.

Every worker runs the same command, ``python -m akd_cli.mm.worker JOB.json`` (see
``akd_cli.options.Job``), for training and evaluation alike, whoever starts it. On one machine or
several, akd runs torch's elastic agent in its own process (what torchrun runs: it sets
MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, watches the workers and ends them all when
one fails); akd keeps the console to one line about a failure, naming the rank. Under Slurm, srun
starts that worker command once per task and the worker reads its rank from the SLURM_* variables.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

from akd_cli.errors import UserError
from akd_cli.options import Job, LaunchPlan

WORKER_MODULE = "akd_cli.mm.worker"


def cuda_device_count() -> int:
    """GPUs visible to torch, without initialising CUDA in this process for long."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install counts as none
        return 0


def resolve_device(plan: LaunchPlan) -> str:
    """Check the plan against the machine before anything starts; returns 'cuda' or 'cpu'."""
    if plan.device == "cpu":
        return "cpu"
    available = cuda_device_count()
    if plan.device == "cuda" or available > 0:
        if plan.nproc_per_node > available:
            raise UserError(f"asked for {plan.nproc_per_node} GPU(s) but this machine has {available}"
                            + ("" if available else "; --device cpu runs the workers on the CPU (gloo)"))
        return "cuda"
    if plan.nproc_per_node > 1:
        raise UserError(f"asked for {plan.nproc_per_node} GPUs but this machine has none; "
                        f"--device cpu runs {plan.nproc_per_node} CPU workers (gloo) instead")
    return "cpu"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> bool:
    """Join the process group the launcher's variables describe (NCCL on CUDA, gloo on the CPU);
    False for a single process."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return True


def run_job(job: Job) -> Any:
    """Run a job: in this process for one worker, else on the plan's workers; rank 0's result."""
    plan = job.options.launch
    if plan.world_size == 1:
        from akd_cli.mm.worker import run

        return run(job)
    scratch = Path(tempfile.mkdtemp(prefix="akd-job-"))
    try:
        result = scratch / "result.json"
        job_file = job.with_result_file(str(result)).write(scratch / "job.json")
        run_workers([str(job_file)], plan, job.device)
        return json.loads(result.read_text())["result"] if result.is_file() else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _worker_environment(plan: LaunchPlan, device: str) -> Iterator[None]:
    """What the workers inherit besides the ranks the agent gives them: this process's pid (a worker
    ends when its launcher dies), a fair share of the CPU threads, and no GPU for a CPU run."""
    from akd_cli.mm.worker import LAUNCHER_PID_ENV

    saved = dict(os.environ)
    os.environ.update({LAUNCHER_PID_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"})
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node)))
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _launch_config(plan: LaunchPlan, port: int, log_dir: str, poll_s: float):
    """torch's elastic agent (what torchrun runs), one node of a static rendezvous: fixed world size,
    node 0 hosting the store at MASTER_ADDR:MASTER_PORT, no restarts. Only rank 0 writes to the
    console's stdout; the others' stdout goes to the agent's log dir (stderr stays on the console)."""
    import dataclasses

    from torch.distributed.elastic.multiprocessing import Std
    from torch.distributed.launcher.api import LaunchConfig

    quiet = {local: Std.OUT for local in range(plan.nproc_per_node)
             if plan.node_rank * plan.nproc_per_node + local != 0}
    config = dict(min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc_per_node,
                  run_id=f"akd-{plan.master_addr}-{port}", rdzv_backend="static",
                  rdzv_endpoint=f"{plan.master_addr}:{port}", rdzv_configs={"rank": plan.node_rank},
                  max_restarts=0, monitor_interval=poll_s)
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    if "logs_specs" in fields:  # torch >= 2.2
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

        config["logs_specs"] = DefaultLogsSpecs(log_dir=log_dir, redirects=quiet)
    else:
        config.update(log_dir=log_dir, redirects=quiet)
    return LaunchConfig(**config)


def run_workers(worker_args: Sequence[str], plan: LaunchPlan, device: str, poll_s: float = 0.5,
                module: str = WORKER_MODULE) -> None:
    """Run ``python -m <module> <worker_args>`` once per local worker under torch's elastic agent
    and wait for all.

    A worker that exits non-zero ends the others (the agent's SIGTERM, then SIGKILL) and raises a
    UserError naming its rank and exit code. Ctrl-C ends them all.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    port = plan.master_port or (free_port() if plan.nnodes == 1 else 29500)
    log_dir = tempfile.mkdtemp(prefix="akd-workers-")
    # The agent reports failures in its own multi-line form; akd says it in one line below.
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with _worker_environment(plan, device):
            elastic_launch(_launch_config(plan, port, log_dir, poll_s), sys.executable)("-m", module, *worker_args)
    except SignalException as exc:
        import signal

        # The agent turns the signals it gets into this exception once it has ended the workers.
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise UserError(f"stopped by {signal.Signals(exc.sigval).name}; the workers were ended") from None
    except ChildFailedError as exc:
        import signal

        # The agent ends the surviving workers with SIGTERM; the failure to name is the one before.
        own = {r: f for r, f in exc.failures.items() if f.exitcode != -signal.SIGTERM} or exc.failures
        rank, failure = min(own.items())
        code = failure.exitcode
        reason = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise UserError(f"worker rank {rank} failed ({reason}); stopped the other workers") from None
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


# --- Slurm -------------------------------------------------------------------------------------

def in_slurm_step() -> bool:
    return "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ


def slurm_env(default_port: int = 29500) -> Dict[str, str]:
    """torch.distributed variables from the Slurm step this process is a task of."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = [nodelist.split(",")[0]]
    ntasks = int(os.environ["SLURM_NTASKS"])
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    return dict(MASTER_ADDR=os.environ.get("MASTER_ADDR", hosts[0]),
                MASTER_PORT=os.environ.get("MASTER_PORT", str(default_port)),
                WORLD_SIZE=str(ntasks), RANK=os.environ["SLURM_PROCID"],
                LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
                LOCAL_WORLD_SIZE=str(max(1, ntasks // max(nnodes, 1))))


def srun_command(job_file: str, plan: LaunchPlan, job_name: str = "akd", extra: Sequence[str] = ()) -> List[str]:
    """The srun line that starts the worker command on a job file, one Slurm task per GPU."""
    cmd = ["srun", f"--job-name={job_name}", f"--nodes={plan.nnodes}", f"--ntasks-per-node={plan.nproc_per_node}",
           f"--ntasks={plan.world_size}", "--kill-on-bad-exit=1"]
    if plan.device != "cpu":
        cmd.append(f"--gres=gpu:{plan.nproc_per_node}")
    if plan.partition:
        cmd.append(f"--partition={plan.partition}")
    cmd += list(extra)
    return cmd + [sys.executable, "-m", WORKER_MODULE, job_file]


def srun(job: Job) -> None:
    """Replace this process by srun running the job's workers (the job file lies in the work dir)."""
    job_file = job.write(Path(job.work_dir) / "job.json")
    cmd = srun_command(str(job_file), job.options.launch)
    if shutil.which("srun") is None:
        raise UserError(f"srun not found: run this inside a Slurm allocation, e.g. {describe(cmd)}")
    print(f"starting: {describe(cmd)}", flush=True)
    os.execvp(cmd[0], cmd)


def describe(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)

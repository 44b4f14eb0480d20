"""Starting workers: one process, N processes on this machine, several machines, or Slurm.

Like torchrun, the launcher sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK and
LOCAL_WORLD_SIZE and starts one process per worker; unlike torchrun it keeps its own output short,
stops the whole job when one worker dies, and names that worker's rank.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from akd_cli.errors import UserError


@dataclass
class LaunchPlan:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None
    device: str = "auto"          # auto | cuda | cpu

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def cuda_device_count() -> int:
    """GPUs visible to torch, without initialising CUDA in this process for long."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install counts as none
        return 0


def resolve_device(plan: LaunchPlan) -> str:
    """Check the request against the machine before anything starts; returns 'cuda' or 'cpu'."""
    if plan.nproc_per_node < 1 or plan.nnodes < 1:
        raise UserError("--gpus and --nnodes must be at least 1")
    if not 0 <= plan.node_rank < plan.nnodes:
        raise UserError(f"--node-rank must be in [0, {plan.nnodes - 1}], got {plan.node_rank}")
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


def worker_env(plan: LaunchPlan, local_rank: int, device: str, port: int) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(plan.world_size),
               RANK=str(plan.node_rank * plan.nproc_per_node + local_rank), LOCAL_RANK=str(local_rank),
               LOCAL_WORLD_SIZE=str(plan.nproc_per_node), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node)))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_workers(worker_args: Sequence[str], plan: LaunchPlan, device: str, poll_s: float = 0.5,
                module: str = "akd_cli.mm.train") -> None:
    """Run ``python -m <module> <worker_args>`` once per local worker and wait for all.

    A worker that exits non-zero ends the others (SIGTERM, then SIGKILL) and raises a UserError
    naming its rank and exit code. Ctrl-C ends them all.
    """
    port = plan.master_port or (free_port() if plan.nnodes == 1 else 29500)
    command = [sys.executable, "-m", module, *worker_args]
    processes: List[subprocess.Popen] = []
    try:
        for local_rank in range(plan.nproc_per_node):
            # Only rank 0 draws the progress bar; the others keep to the log file.
            quiet = plan.node_rank * plan.nproc_per_node + local_rank != 0
            processes.append(subprocess.Popen(
                command, env=worker_env(plan, local_rank, device, port),
                stdout=subprocess.DEVNULL if quiet else None, stderr=None, start_new_session=True))
        while True:
            codes = [p.poll() for p in processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                local_rank, code = failed[0]
                rank = plan.node_rank * plan.nproc_per_node + local_rank
                _stop(processes)
                reason = f"signal {-code}" if code < 0 else f"exit code {code}"
                raise UserError(f"worker rank {rank} failed ({reason}); stopped the other workers")
            if all(c == 0 for c in codes):
                return
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(processes)
        raise


def _stop(processes: List[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


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


def srun_command(akd_args: Sequence[str], plan: LaunchPlan, partition: Optional[str], job_name: str = "akd",
                 extra: Sequence[str] = ()) -> List[str]:
    """The srun line that runs this same `akd train` as one Slurm task per GPU."""
    cmd = ["srun", f"--job-name={job_name}", f"--nodes={plan.nnodes}", f"--ntasks-per-node={plan.nproc_per_node}",
           f"--ntasks={plan.world_size}", "--kill-on-bad-exit=1"]
    if plan.device != "cpu":
        cmd.append(f"--gres=gpu:{plan.nproc_per_node}")
    if partition:
        cmd.append(f"--partition={partition}")
    cmd += list(extra)
    return cmd + [sys.executable, "-m", "akd_cli.cli", *akd_args]


def describe(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)

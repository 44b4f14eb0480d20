"""The one worker entry of akd: ``python -m akd_cli.mm.worker JOB.json``.

Training and evaluation workers alike, started by akd's launcher (torchrun's variables), by srun
(the SLURM_* variables), or by hand. The job file (``akd_cli.options.Job``) holds everything the
worker needs; nothing is parsed again and no config is rebuilt. ``run(job)`` is the same work in
the calling process (a one-worker run).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

from akd_cli.options import Job, TrainOptions

LAUNCHER_PID_ENV = "AKD_LAUNCHER_PID"


def run(job: Job) -> Any:
    """This process's share of the job; rank 0 returns the result (the exported checkpoint's path
    for training, the metrics record for evaluation), the other ranks None."""
    if job.options.trust_checkpoint:
        from akd_cli.mm.checkpoints import TRUST_ENV

        os.environ[TRUST_ENV] = "1"
    if isinstance(job.options, TrainOptions):
        from akd_cli.mm.train import train

        return train(job)
    from akd_cli.mm.evaluate import evaluate

    return evaluate(job)


def end_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when the process that started it dies, by any signal
    (SIGKILL included): a worker then never outlives its launcher to keep writing into a work dir.
    Workers run in sessions of their own, so a signal to the launcher's process group misses them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.environ.get(LAUNCHER_PID_ENV)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if launcher and os.getppid() != int(launcher):  # it died before the request was in place
        sys.exit(1)


def main(argv: Optional[list] = None) -> None:
    from akd_cli import fileio
    from akd_cli.mm import launch

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m akd_cli.mm.worker JOB.json", file=sys.stderr)
        sys.exit(2)
    end_with_parent()
    job = Job.read(argv[0])
    if launch.in_slurm_step():
        os.environ.update(launch.slurm_env(job.options.launch.master_port or 29500))
    try:
        result = run(job)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the launcher says it once
        sys.exit(130)
    except Exception as exc:  # known failures: one line and exit code 2; bugs keep their traceback
        from akd_cli.mm.checks import friendly_message

        message = friendly_message(exc)
        if message is None:
            raise
        print(f"error (rank {os.environ.get('RANK', '0')}): {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    if result is not None and job.result_file:
        fileio.write_json(job.result_file, {"result": result})


if __name__ == "__main__":
    main()

"""Training entry point: one worker process (rank) of a run, or the whole run on one process.

Launching several is ``akd_cli.mm.launch``'s job; this module reads RANK / WORLD_SIZE / LOCAL_RANK
from the environment like any torch.distributed worker. ``python -m akd_cli.mm.train CONFIG WORK_DIR``
runs a worker directly.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import os.path as osp
import sys
import time
from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker runs its config; crosses process boundaries as command-line flags."""
    seed: int = 0
    deterministic: bool = False
    resume: bool = False
    amp: bool = False
    validate: bool = True
    verbose: bool = False

    def to_argv(self) -> List[str]:
        flags = [("--deterministic", self.deterministic), ("--resume", self.resume), ("--amp", self.amp),
                 ("--no-validate", not self.validate), ("--verbose", self.verbose)]
        return ["--seed", str(self.seed)] + [flag for flag, on in flags if on]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WorkerOptions":
        return cls(seed=args.seed, deterministic=args.deterministic, resume=args.resume, amp=args.amp,
                   validate=not args.no_validate, verbose=args.verbose)


def _init_distributed() -> bool:
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
    return True


def _remove_partial_checkpoints(work_dir: str) -> None:
    """Leftovers of a run killed while saving: never complete, never loaded, safe to drop."""
    leftovers = [p for pattern in ("*.partial-*", ".*.partial-*", ".latest.pth.*")
                 for p in glob.glob(osp.join(work_dir, pattern))]
    for path in leftovers:
        try:
            os.remove(path)
        except OSError:
            pass


def _console_shows_warnings_only(*logger_names: str) -> None:
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # the console, not the log file
                handler.setLevel(logging.WARNING)


def train(config_path: str, work_dir: str, options: WorkerOptions = WorkerOptions()) -> Optional[str]:
    """Train from a generated config; returns the exported student checkpoint, or for token learning
    the token file (rank 0).
    The console shows the progress bar and warnings (all of mmdet's log with ``verbose``); the log
    file in the work dir always has everything."""
    from akd_cli.mm import compat

    compat.apply()
    import mmcv
    import torch
    from mmcv import Config
    from mmcv.runner import get_dist_info

    import akd_cli.mm.distiller  # noqa: F401  (registers the distiller, runner and hooks)
    import akd_cli.mm.token_learning  # noqa: F401  (registers the token learner)
    from akd_cli import __version__
    from akd_cli.mm.console import stack_stdout_hidden
    from mmdet import __version__ as mmdet_version
    from mmdet.apis import set_random_seed, train_detector
    from mmdet.datasets import build_dataset
    from mmdet.models import build_detector
    from mmdet.utils import get_root_logger

    cfg = Config.fromfile(config_path)
    cfg.work_dir = work_dir
    distributed = _init_distributed()
    rank, world_size = get_dist_info()
    cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.gpu_ids = [int(os.environ.get("LOCAL_RANK", "0"))] if cfg.device == "cuda" else [0]
    if options.amp:
        cfg.fp16 = dict(loss_scale="dynamic")
    if options.resume:
        cfg.auto_resume = True
        cfg.resume_from = None
    mmcv.mkdir_or_exist(work_dir)
    if rank == 0:
        _remove_partial_checkpoints(work_dir)
    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    logger = get_root_logger(log_file=osp.join(work_dir, f"{timestamp}.log"), log_level=cfg.get("log_level", "INFO"))
    compat.route_init_report_to(logger.name)
    if not options.verbose:
        _console_shows_warnings_only(logger.name, "mmcv")
    # The same seed on every rank, as mmdet's tools do without --diff-seed.
    set_random_seed(options.seed, deterministic=options.deterministic)
    cfg.seed = options.seed
    meta = dict(seed=options.seed, exp_name=osp.basename(config_path), config=cfg.pretty_text)
    with stack_stdout_hidden(not options.verbose):
        datasets = [build_dataset(cfg.data.train)]
        model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
        model.init_weights()
        model.CLASSES = datasets[0].CLASSES
        cfg.checkpoint_config.meta = dict(mmdet_version=mmdet_version, akd_version=__version__,
                                          CLASSES=datasets[0].CLASSES)
        logger.info(f"akd {__version__}: {world_size} worker(s) on {cfg.device}, config {config_path}")
        train_detector(model, datasets, cfg, distributed=distributed, validate=options.validate, timestamp=timestamp,
                       meta=meta)
    if rank != 0:
        return None
    latest = osp.join(work_dir, "latest.pth")
    if cfg.model.type == "ReceptiveTokenLearner":
        from akd_cli.mm.token_learning import export_tokens

        return export_tokens(latest, osp.join(work_dir, "tokens.pth"))
    from akd_cli.mm.checkpoints import export_student

    return export_student(latest, osp.join(work_dir, "student.pth"))


def worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="one akd training worker")
    parser.add_argument("config")
    parser.add_argument("work_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--result-file", default=None, help="where rank 0 writes the exported file's path")
    return parser


def main(argv=None) -> None:
    args = worker_parser().parse_args(argv)
    try:
        student = train(args.config, args.work_dir, WorkerOptions.from_args(args))
    except Exception as exc:  # known failures: one line and exit code 2; bugs keep their traceback
        from akd_cli.mm.checks import friendly_message

        message = friendly_message(exc)
        if message is None:
            raise
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    if student and args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"exported": student}, f)


if __name__ == "__main__":
    main()


def last_validation(work_dir: str) -> Optional[dict]:
    """The last validation record of the newest JSON log in a work dir (None if there is none)."""
    logs = sorted(glob.glob(osp.join(work_dir, "*.log.json")))
    for path in reversed(logs):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip().startswith("{")]
        vals = [r for r in records if r.get("mode") == "val"]
        if vals:
            return vals[-1]
    return None

"""Training in one worker process (one rank of a run, or the whole run in one process).

Started through ``akd_cli.mm.worker`` (``python -m akd_cli.mm.worker JOB.json``), which hands it
the job; ranks come from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK).
"""
from __future__ import annotations

import glob
import importlib
import json
import logging
import os
import os.path as osp
import time
from typing import Optional

from akd_cli.options import Job


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


def _run_logger(log_file: str, level: str):
    """mmdet's root logger writing into this run's own log file. mmcv sets a logger up once per
    process and keeps its first file, so a second run in the same process (the demo's students after
    its teacher, a study's runs) would log into the first run's directory: start it afresh."""
    from mmcv.utils.logging import logger_initialized
    from mmdet.utils import get_root_logger

    logger = logging.getLogger("mmdet")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger_initialized.pop("mmdet", None)
    return get_root_logger(log_file=log_file, log_level=level)


def train(job: Job) -> Optional[str]:
    """Train the job's config on the job's device; returns (rank 0) the exported student checkpoint,
    or for token learning the token file.
    The console shows the progress bar and warnings (all of mmdet's log with ``verbose``); the log
    file in the work dir always has everything."""
    from akd_cli.mm import compat

    compat.apply()
    import mmcv
    from mmcv import Config
    from mmcv.runner import get_dist_info

    from akd_cli import __version__
    from akd_cli.mm.config import REGISTERING_MODULES
    from akd_cli.mm.console import stack_stdout_hidden
    from akd_cli.mm.launch import init_distributed
    from mmdet import __version__ as mmdet_version
    from mmdet.apis import set_random_seed, train_detector
    from mmdet.datasets import build_dataset
    from mmdet.models import build_detector

    for module in REGISTERING_MODULES:  # the distiller, runners, hooks and token learner
        importlib.import_module(module)
    options, work_dir, config_path = job.options, job.work_dir, job.config
    cfg = Config.fromfile(config_path)
    cfg.work_dir = work_dir
    distributed = init_distributed(job.device)
    rank, world_size = get_dist_info()
    # The launcher resolved the device against the machine and the user's --device: a worker never
    # picks another (a CPU run on a GPU machine stays on the CPU).
    cfg.device = job.device
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
    logger = _run_logger(osp.join(work_dir, f"{timestamp}.log"), cfg.get("log_level", "INFO"))
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
        validate = options.validate and options.kind != "tokens"  # token learning has no detections to score
        train_detector(model, datasets, cfg, distributed=distributed, validate=validate, timestamp=timestamp,
                       meta=meta)
    if rank != 0:
        return None
    latest = osp.join(work_dir, "latest.pth")
    if cfg.model.type == "ReceptiveTokenLearner":
        from akd_cli.mm.token_learning import export_tokens

        return export_tokens(latest, osp.join(work_dir, "tokens.pth"))
    from akd_cli.mm.checkpoints import export_student

    return export_student(latest, osp.join(work_dir, "student.pth"))


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

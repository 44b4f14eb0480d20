"""COCO bbox evaluation of a checkpoint: an exported student, a full distiller checkpoint (its
student is evaluated) or a teacher checkpoint, on one or many workers.

The metrics are pycocotools' COCOeval with the parameters mmdet's CocoDataset.evaluate uses, on the
detections mmdet's own results2json writes, so the numbers equal mmdet's test path (which rounds
them to four decimals) and pycocotools run on the dumped detections.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from akd_cli import fileio
from akd_cli.errors import UserError
from akd_cli.options import EvalOptions, Job, TrainOptions

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_config(options: EvalOptions):
    """The config to evaluate with: --config, --preset, or the config.py of the checkpoint's work dir."""
    from mmcv import Config

    from akd_cli.mm.config import build_config, merge_cfg_options, read_config
    from akd_cli.mm.data import move_onto
    from akd_cli.presets import load_preset

    if options.preset:
        cfg = build_config(load_preset(options.preset), TrainOptions(preset=options.preset, data_root=options.data_root))
    else:
        path = Path(options.config) if options.config else Path(os.path.realpath(options.checkpoint)).parent / "config.py"
        if not path.is_file():
            raise UserError(f"config not found: {path}" if options.config else
                            f"no config.py beside {options.checkpoint}: pass --preset or --config")
        cfg = read_config(path)
        if options.data_root:
            tree = cfg._cfg_dict.to_dict()
            move_onto(tree, options.data_root, categories_from="val")  # COCO's train file is 450 MB
            cfg = Config(tree)
    merge_cfg_options(cfg, options.cfg_options)
    return cfg


def _work_dir_role(cfg) -> str:
    akd = cfg.get("akd", {}) or {}
    role = akd.get("role")
    if role in ("teacher", "baseline"):
        return role
    if role == "distilled":
        avatars = cfg.model.get("avatars") or {}
        if not avatars.get("num_avatars", 1):
            return "kd"
        return "akd-paper" if avatars.get("uncertainty") == "paper" else "akd"
    return "student"


def select_model(cfg, state_dict: Dict[str, Any], checkpoint: str):
    """(model config, weights, role) for this checkpoint; a checkpoint that fits nothing names the keys."""
    import akd_cli.mm.distiller  # noqa: F401  (registers AKDDistiller, whose configs this reads)
    from akd_cli.mm.checkpoints import CheckpointMismatch, checkpoint_role, load_checked, student_state_dict
    from mmdet.models import build_detector

    model_cfg = cfg.model
    if model_cfg.get("type") != "AKDDistiller":
        candidates = [("detector", model_cfg)]
    else:
        candidates = [("student", model_cfg.student)]
        if model_cfg.get("teacher"):
            candidates.append(("teacher", model_cfg.teacher))
    if checkpoint_role(state_dict) == "distiller":
        if model_cfg.get("type") != "AKDDistiller":
            raise UserError(f"{checkpoint} is a full akd checkpoint but the config is a plain detector's")
        state_dict, candidates = student_state_dict(state_dict), candidates[:1]
    first_error = None
    for role, candidate in candidates:
        model = build_detector(candidate)
        try:
            load_checked(model, state_dict, checkpoint, "student" if role == "detector" else role)
        except CheckpointMismatch as exc:
            first_error = first_error or exc
            continue
        return model, role
    raise UserError(str(first_error))


def coco_metrics(dataset, results_json: str) -> Dict[str, float]:
    """COCOeval (bbox) with mmdet's parameters on a COCO results file."""
    from pycocotools.cocoeval import COCOeval

    from pycocotools.coco import COCO

    with open(results_json) as f:
        detections = json.load(f)
    coco_gt = dataset.coco
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:
            # loadRes fails on an empty list; an empty result set scores as pycocotools scores it
            # (0 where there is ground truth, -1 for a size range without any)
            coco_dt = COCO()
            coco_dt.dataset = dict(images=list(coco_gt.dataset["images"]), annotations=[],
                                   categories=list(coco_gt.dataset["categories"]))
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.catIds = dataset.cat_ids
        evaluator.params.imgIds = dataset.img_ids
        evaluator.params.maxDets = [100, 300, 1000]  # mmdet's proposal_nums default
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for i, name in enumerate(METRIC_NAMES)}


def run_inference(model, data_loader, device: str, rank: int, world_size: int, total: int) -> List[Any]:
    import torch
    from mmdet.utils import build_dp
    from rich.progress import TextColumn

    from akd_cli.mm.console import progress

    local = int(os.environ.get("LOCAL_RANK", "0"))
    model = build_dp(model, device, device_ids=[local])  # on the CPU it stays there (see compat)
    model.eval()
    results: List[Any] = []
    display = progress(TextColumn("[bold]eval[/]")) if rank == 0 else contextlib.nullcontext()
    with display as bar:
        task = bar.add_task("eval", total=total) if rank == 0 else None
        for data in data_loader:
            with torch.no_grad():
                batch = model(return_loss=False, rescale=True, **data)
            results.extend(batch)
            if rank == 0:
                bar.update(task, advance=min(len(batch) * world_size, total - bar.tasks[0].completed))
    return results


def evaluate(job: Job) -> Optional[Dict[str, Any]]:
    """Evaluate in this process (one of WORLD_SIZE workers) on the job's device; rank 0 returns the
    metrics record."""
    from akd_cli.mm import compat

    compat.apply()
    import torch.distributed as dist
    from mmcv import Config
    from mmcv.runner import get_dist_info

    from akd_cli import __version__
    from akd_cli.mm.checkpoints import load_state_dict
    from akd_cli.mm.console import stack_stdout_hidden
    from akd_cli.mm.launch import init_distributed
    from mmdet.apis.test import collect_results_cpu
    from mmdet.datasets import build_dataloader, build_dataset, replace_ImageToTensor

    options = job.options
    cfg = Config.fromfile(job.config)
    state_dict = load_state_dict(options.checkpoint)
    model, fitted_role = select_model(cfg, state_dict, options.checkpoint)
    role = options.role or (fitted_role if fitted_role in ("teacher", "detector") else _work_dir_role(cfg))
    distributed = init_distributed(job.device)
    rank, world_size = get_dist_info()
    device = job.device
    test_cfg = cfg.data.test
    test_cfg.test_mode = True
    if options.batch_size > 1:
        test_cfg.pipeline = replace_ImageToTensor(test_cfg.pipeline)
    with stack_stdout_hidden():
        dataset = build_dataset(test_cfg)
    loader = build_dataloader(dataset, samples_per_gpu=options.batch_size, workers_per_gpu=cfg.data.get("workers_per_gpu", 0),
                              dist=distributed, shuffle=False)
    model.CLASSES = dataset.CLASSES
    results = run_inference(model, loader, device, rank, world_size, len(dataset))
    if distributed:
        shared = Path(tempfile.gettempdir()) / f"akd-eval-{os.environ.get('MASTER_PORT', '0')}"
        results = collect_results_cpu(results, len(dataset), str(shared))
        dist.barrier()
    if rank != 0:
        return None
    scratch = Path(tempfile.mkdtemp(prefix="akd-eval-"))
    try:
        files = dataset.results2json(results, str(scratch / "results"))
        metrics = coco_metrics(dataset, files["bbox"])
        if options.dump:
            fileio.copy(files["bbox"], options.dump)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    akd = cfg.get("akd", {}) or {}
    record = {
        "preset": options.preset or akd.get("preset"),
        "role": role,
        "method": akd.get("method") if role in ("kd", "akd", "akd-paper") else None,
        "num_avatars": (cfg.model.get("avatars") or {}).get("num_avatars") if role.startswith("akd") else None,
        "uncertainty": (cfg.model.get("avatars") or {}).get("uncertainty") if role.startswith("akd") else None,
        "checkpoint": os.path.abspath(options.checkpoint),
        "checkpoint_sha256": sha256(options.checkpoint),
        "dataset": {"ann_file": os.path.abspath(test_cfg.ann_file), "images": len(dataset)},
        "metrics": metrics,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "akd_version": __version__,
        "device": device, "workers": world_size,
    }
    out = options.metrics_file or str(Path(options.checkpoint).resolve().parent / "metrics.json")
    fileio.write_json(out, record)
    record["metrics_file"] = out
    return record


def launch_eval(options: EvalOptions) -> Dict[str, Any]:
    """Resolve the config once, check the data, then evaluate in this process or on the plan's
    workers; returns the metrics record."""
    from akd_cli.mm import compat

    compat.apply()
    from akd_cli.mm.data import check_data
    from akd_cli.mm.config import dump_config
    from akd_cli.mm.launch import resolve_device, run_job

    if not Path(options.checkpoint).is_file():
        raise UserError(f"checkpoint not found: {options.checkpoint}")
    device = resolve_device(options.launch)
    cfg = resolve_config(options)
    check_data(cfg.data, splits=("test",))
    scratch = Path(tempfile.mkdtemp(prefix="akd-eval-"))
    try:
        config = dump_config(cfg, scratch / "config.py")
        return run_job(Job(options=options, config=str(config), work_dir=str(scratch), device=device))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

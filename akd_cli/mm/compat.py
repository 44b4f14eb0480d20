"""Compatibility patches for running the mmcv-full 1.x / mmdet 2.x stack on torch 2.x.

``apply()`` is idempotent and is called by every akd entry point that touches mmcv/mmdet, and by
generated configs through ``custom_imports`` (so mmdet's own tools/train.py gets them too).
Each patch says why it exists; remove a patch once the stack it works around is gone.
"""
from __future__ import annotations

import os
import warnings

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _quiet_known_warnings()
    _restore_numpy_aliases()
    _allow_cpu_distributed_data_parallel()
    _cpu_data_parallel_stays_on_the_cpu()
    _scatter_streams_by_device_index()
    _load_checkpoints_weights_only()
    _reppoints_valid_flags_where_the_points_are()
    _progress_bars_follow_stdout()
    _APPLIED = True


def _quiet_known_warnings() -> None:
    # Why: every process of every run printed these. torchvision's optional image extension does
    # not load against the CPU torch (we never use torchvision.io), and mmcv 1.x announces its 2.0
    # renaming on import. Neither is actionable for an akd user.
    warnings.filterwarnings("ignore", message="Failed to load image Python extension")
    warnings.filterwarnings("ignore", message="On January 1, 2023, MMCV will release v2.0.0")
    # mmdet 2.x's anchor and point generators call torch.meshgrid without `indexing`, relying on
    # the old default ('ij'); torch warns on every run.
    warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")


def _restore_numpy_aliases() -> None:
    # Why: numpy 2 removed the `np.int` / `np.float` aliases, which mmdet 2.28 still uses in
    # CustomDataset.get_cat_ids (class-balanced sampling) and the IoU-balanced sampler, and mmcv
    # 1.7 in pixel_group. They meant the builtins, so restoring them is exact.
    import numpy as np

    for name, builtin in (("int", int), ("float", float), ("bool", bool), ("object", object)):
        if name not in np.__dict__:
            setattr(np, name, builtin)


def _allow_cpu_distributed_data_parallel() -> None:
    # Why: mmdet's build_ddp asserts a CUDA/MLU/NPU device, and mmcv's MMDistributedDataParallel,
    # given no device ids (the CPU case), passes DataContainers to the model unscattered. With
    # these two fixed, torch.distributed on CPU (gloo) trains through the unchanged mmdet path.
    import torch
    from mmcv.parallel import MMDistributedDataParallel
    from mmcv.parallel.scatter_gather import scatter_kwargs

    # Why: mmcv's _run_ddp_forward (every forward outside train_step, e.g. distributed evaluation)
    # reads DDP's `_use_replicated_tensor_module`, which torch 2.1 removed: on GPUs and CPUs alike
    # it raised AttributeError. The replicated-tensor path it selected no longer exists.
    if not hasattr(torch.nn.parallel.DistributedDataParallel, "_use_replicated_tensor_module"):
        MMDistributedDataParallel._use_replicated_tensor_module = False

    class CPUDistributedDataParallel(MMDistributedDataParallel):
        """MMDistributedDataParallel for CPU processes: DataContainers scattered to the CPU."""

        def _unwrap(self, inputs, kwargs):
            inputs, kwargs = scatter_kwargs(inputs, kwargs, [-1], dim=self.dim)
            return inputs[0], kwargs[0]

        def _run_ddp_forward(self, *inputs, **kwargs):
            inputs, kwargs = self._unwrap(inputs, kwargs)
            return self.module(*inputs, **kwargs)

        def train_step(self, *inputs, **kwargs):
            inputs, kwargs = self._unwrap(inputs, kwargs)
            return super().train_step(*inputs, **kwargs)

        def val_step(self, *inputs, **kwargs):
            inputs, kwargs = self._unwrap(inputs, kwargs)
            return super().val_step(*inputs, **kwargs)

    import mmdet.utils.util_distribution as dist_utils
    original = dist_utils.build_ddp

    def build_ddp(model, device="cuda", *args, **kwargs):
        if device != "cpu":
            return original(model, device, *args, **kwargs)
        kwargs.pop("device_ids", None)
        kwargs.pop("output_device", None)
        return CPUDistributedDataParallel(model.cpu(), *args, **kwargs)

    dist_utils.build_ddp = build_ddp
    dist_utils.CPUDistributedDataParallel = CPUDistributedDataParallel
    import mmdet.utils
    mmdet.utils.build_ddp = build_ddp
    try:  # mmdet.apis.train imported the name at its own import time
        import mmdet.apis.train as mmdet_train
        mmdet_train.build_ddp = build_ddp
    except ImportError:
        pass


def _cpu_data_parallel_stays_on_the_cpu() -> None:
    # Why: mmdet's build_dp wraps a CPU model in MMDataParallel, whose torch base class moves the
    # model to cuda:0 whenever torch sees a GPU: `--device cpu` on a GPU machine trained and
    # evaluated on the GPU. mmcv's MMDataParallel already runs on the CPU when it has no device ids
    # (it scatters the DataContainers to the CPU); this wrapper gives it none, and moves nothing.
    import torch
    from mmcv.parallel import MMDataParallel

    class CPUDataParallel(MMDataParallel):
        """MMDataParallel for a model that stays on the CPU, GPU or not."""

        def __init__(self, module, dim=0, **_ignored):
            torch.nn.Module.__init__(self)
            self.module, self.dim, self.device_ids = module, dim, []
            self.output_device, self.src_device_obj = None, torch.device("cpu")

    import mmdet.utils.util_distribution as dist_utils

    dist_utils.dp_factory["cpu"] = CPUDataParallel
    dist_utils.CPUDataParallel = CPUDataParallel


def _scatter_streams_by_device_index() -> None:
    # Why: mmcv 1.7's Scatter, which moves every batch to the GPU for MMDataParallel and
    # MMDistributedDataParallel, passes int device indices to torch's private _get_stream; since
    # torch 2.1 that takes a torch.device, so every GPU training and evaluation step failed with
    # "'int' object has no attribute 'type'". mmcv's copy code was written for torch.cuda.Stream:
    # it gets one such background stream per device again.
    import mmcv.parallel._functions as mmcv_scatter
    import torch

    streams = {}

    def copy_stream(device):
        index = device.index if isinstance(device, torch.device) else device
        if index is None or index < 0:
            return None
        if index not in streams:
            streams[index] = torch.cuda.Stream(device=index)
        return streams[index]

    mmcv_scatter._get_stream = copy_stream


def _load_checkpoints_weights_only() -> None:
    # Why: mmcv 1.x calls torch.load without weights_only. torch>=2.6 then defaults to
    # weights_only=True for files, but torch.hub's URL loader (used by mmcv for model-zoo URLs)
    # still unpickles arbitrary code. Loading plain weights is always safe; anything else must be the
    # user's explicit choice, and a refusal must say so in one line instead of a pickle traceback.
    from mmcv.runner.checkpoint import CheckpointLoader

    from akd_cli.mm.checkpoints import cached_download, load_checkpoint_file

    def load_from_local(filename, map_location=None):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"checkpoint not found: {filename}")
        return load_checkpoint_file(filename, map_location)

    def load_from_http(filename, map_location=None, model_dir=None):
        return load_checkpoint_file(cached_download(filename, model_dir), map_location)

    CheckpointLoader.register_scheme(prefixes="", force=True)(load_from_local)
    CheckpointLoader.register_scheme(prefixes=["http://", "https://"], force=True)(load_from_http)


def _reppoints_valid_flags_where_the_points_are() -> None:
    # Why: mmdet 2.28's RepPointsHead.get_points puts the points on the features' device but asks
    # MlvlPointGenerator.valid_flags without a device, whose default is 'cuda': RepPoints could not
    # train on a CPU-only torch, nor on the CPU of a GPU machine (indices on another device). The
    # anchor heads pass the device; this does the same.
    from mmdet.models.dense_heads.reppoints_head import RepPointsHead

    def get_points(self, featmap_sizes, img_metas, device):
        points = self.prior_generator.grid_priors(featmap_sizes, device=device, with_stride=True)
        points_list = [[p.clone() for p in points] for _ in img_metas]
        valid_flag_list = [self.prior_generator.valid_flags(featmap_sizes, meta["pad_shape"], device=device)
                           for meta in img_metas]
        return points_list, valid_flag_list

    RepPointsHead.get_points = get_points


def route_init_report_to(logger_name: str) -> None:
    # Why: mmcv 1.7's rfsearch module creates the 'mmcv' logger when mmcv.cnn is imported, and
    # BaseModule.init_weights reports to the first logger ever created. So every parameter's
    # initialisation (hundreds of lines) went to the console, not to the run's log file, which
    # only mmdet's logger writes. Moving the run's logger to the front restores mmdet 2.x's intent.
    from mmcv.utils.logging import logger_initialized

    if logger_name in logger_initialized:
        for name in [n for n in logger_initialized if n != logger_name]:
            logger_initialized[name] = logger_initialized.pop(name)


def _progress_bars_follow_stdout() -> None:
    # Why: mmcv.ProgressBar's `file=sys.stdout` default is bound when mmcv is imported, so the bar
    # that mmdet's validation hook draws ignored any later redirection of stdout (akd shows its own).
    import sys

    from mmcv.utils import progressbar

    original_init = progressbar.ProgressBar.__init__

    def __init__(self, task_num=0, bar_width=50, start=True, file=None):
        original_init(self, task_num, bar_width, start, sys.stdout if file is None else file)

    progressbar.ProgressBar.__init__ = __init__

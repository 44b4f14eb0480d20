"""mmcv runners and the optimizer constructor of akd runs.

- ``AKDEpochBasedRunner``, ``AKDIterBasedRunner`` (RUNNERS): checkpoints written atomically
  (temporary file, fsync, rename), so a killed run never leaves a truncated checkpoint;
- ``AKDOptimizerConstructor`` (OPTIMIZER_BUILDERS): the optimizer never sees the teacher.
"""
from __future__ import annotations

import os
import os.path as osp

from akd_cli.mm import compat

compat.apply()

import torch.nn as nn  # noqa: E402
from mmcv.runner import (OPTIMIZER_BUILDERS, RUNNERS, DefaultOptimizerConstructor,  # noqa: E402
                         EpochBasedRunner, IterBasedRunner)

from akd_cli.mm.distiller import AKDDistiller  # noqa: E402


@OPTIMIZER_BUILDERS.register_module()
class AKDOptimizerConstructor(DefaultOptimizerConstructor):
    """The default constructor over everything but the teacher (which it never sees)."""

    def __call__(self, model):
        if hasattr(model, "module"):
            model = model.module
        if isinstance(model, AKDDistiller):
            model = nn.ModuleDict({name: child for name, child in model.named_children() if name != "teacher"})
        return super().__call__(model)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class _AtomicCheckpoints:
    """Checkpoints written atomically: a killed run leaves either the previous checkpoint or the new
    one, never a truncated file; ``latest.pth`` is swapped likewise. Mixed into mmcv's runners."""

    checkpoint_template = "{}.pth"

    def checkpoint_number(self) -> int:
        raise NotImplementedError

    def save_checkpoint(self, out_dir, filename_tmpl=None, *, create_symlink=True, **kwargs):
        filename = (filename_tmpl or self.checkpoint_template).format(self.checkpoint_number())
        partial = f"{filename}.partial-{os.getpid()}"
        super().save_checkpoint(out_dir, filename_tmpl=partial, create_symlink=False, **kwargs)
        _fsync(osp.join(out_dir, partial))
        os.replace(osp.join(out_dir, partial), osp.join(out_dir, filename))
        if create_symlink:
            link, tmp_link = osp.join(out_dir, "latest.pth"), osp.join(out_dir, f".latest.pth.{os.getpid()}")
            if osp.lexists(tmp_link):
                os.remove(tmp_link)
            os.symlink(filename, tmp_link)
            os.replace(tmp_link, link)


@RUNNERS.register_module()
class AKDEpochBasedRunner(_AtomicCheckpoints, EpochBasedRunner):
    checkpoint_template = "epoch_{}.pth"

    def checkpoint_number(self) -> int:
        return self.epoch + 1


@RUNNERS.register_module()
class AKDIterBasedRunner(_AtomicCheckpoints, IterBasedRunner):
    checkpoint_template = "iter_{}.pth"

    def checkpoint_number(self) -> int:
        return self.iter + 1

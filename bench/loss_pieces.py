"""A piece of the AKD loss, two ways, timed side by side in one process: akd's code now against what
it replaced, in a whole loss call (forward and backward), the two ways alternating call by call so
that a shared machine's drift falls on both.

- ``standardise``: the release factor's standardisation as torch's batch norm
  (``akd_cli.core.uncertainty.standardise``, as the release's ``nn.BatchNorm2d(affine=False)``)
  against the formula written out (var_mean, subtract, divide: akd's code before 3a44e1e); one
  Avatar and the release's factor (the presets' setting).
- ``finite``: the loss's finiteness check as one min-max reduction per map (``akd._all_finite``)
  against ``isfinite(x).all()`` per map (before 3469b7d); the plain loss and one Avatar with the
  release's factor.
- ``squared-error``: MSE's (MGD's, PKD's) loss against one teacher as the squared error alone
  (``MSELoss.per_image``) against the fused form with its spread, exactly 0 there (before the
  commit after 8e24c19); the plain loss and one Avatar with the release's factor.

    python bench/loss_pieces.py --piece standardise|finite|squared-error [--shapes tiny|r50] [--repeats 200]
                                [--bases maskd,cwd,mgd]

``tiny``: five small FPN levels (2 x 16 channels, 32x32 down to 2x2), where the time is the host's
(bench/host_calls.py's maps); ``r50``: ResNet-50 FPN shapes at 1333x800, batch 2 (bench/core_losses.py's).
This script was ``bench/release_standardise.py`` (the ``standardise`` piece alone) until the
``finite`` piece joined it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import core_losses
import host_calls

SHAPES = {"tiny": host_calls.SHAPES, "r50": core_losses.SHAPES}  # the maps of those benches


def formula(x, eps: float = 1e-5):
    """The standardisation as akd wrote it out before: batch mean and biased variance per channel."""
    import torch

    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    centred = x - mean
    return centred.div_(torch.sqrt(var + eps)) if not centred.requires_grad else centred / torch.sqrt(var + eps)


def isfinite_all(tensors):
    """The finiteness check as akd wrote it before."""
    import torch

    return torch.stack([torch.isfinite(x).all() for x in tensors]).all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--piece", choices=("standardise", "finite", "squared-error"), default="standardise")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--bases", default="maskd,cwd,mgd")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    import akd_cli.core.akd as akd_module
    from akd_cli import AKDLoss
    from akd_cli.core import BASE_LOSSES
    from akd_cli.core.losses import BaseLoss, MSELoss

    owner, attribute, old, old_name, new_name, avatar_counts = {
        "standardise": (akd_module, "standardise", formula, "formula", "batch norm", (1,)),
        "finite": (akd_module, "_all_finite", isfinite_all, "isfinite", "aminmax", (0, 1)),
        "squared-error": (MSELoss, "per_image", BaseLoss.per_image, "fused form", "squared error", (0, 1)),
    }[args.piece]
    new = owner.__dict__[attribute]
    shapes = SHAPES[args.shapes]
    print(f"| base | Avatars | {old_name} | {new_name} | change |\n|---|---|---|---|---|")
    for base in args.bases.split(","):
        for avatars in avatar_counts:
            torch.manual_seed(0)
            options = dict(channels=shapes[0][1], num_levels=len(shapes)) if BASE_LOSSES[base].needs_channels else {}
            if base == "maskd":
                options["student_masks_after"] = 1
            loss_fn = AKDLoss(base=base, num_avatars=avatars, uncertainty="release", **options)
            students = [torch.randn(s, requires_grad=True) for s in shapes]
            teachers = [torch.randn(s) for s in shapes]

            def step():
                loss_fn(students, teachers).backward()
                for s in students:
                    s.grad = None

            ways = ((old_name, old), (new_name, new))
            times = {name: [] for name, _ in ways}
            try:
                for _ in range(2):  # warm-up, both ways
                    for _, way in ways:
                        setattr(owner, attribute, way)
                        step()
                for _ in range(args.repeats):
                    for name, way in ways:
                        setattr(owner, attribute, way)
                        start = time.perf_counter()
                        step()
                        times[name].append(time.perf_counter() - start)
            finally:
                setattr(owner, attribute, new)
            before, after = (1000 * statistics.median(times[name]) for name, _ in ways)
            print(f"| {base} | {avatars} | {before:.2f} ms | {after:.2f} ms | {100 * (after / before - 1):+.1f}% |")


if __name__ == "__main__":
    main()

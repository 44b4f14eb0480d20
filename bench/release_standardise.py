"""The release factor's standardisation, two ways, timed side by side in one process: torch's batch
norm (``akd_cli.core.uncertainty.standardise``, as the release's ``nn.BatchNorm2d(affine=False)``)
against the formula written out (var_mean, subtract, divide: akd's code before 3a44e1e). One loss
call with one Avatar and the release's factor (the presets' setting), forward and backward, the two
ways alternating call by call, so that a shared machine's drift falls on both.

    python bench/release_standardise.py [--shapes tiny|r50] [--repeats 200] [--bases maskd,cwd,mgd]

``tiny``: five small FPN levels (2 x 16 channels, 32x32 down to 2x2), where the time is the host's
(bench/host_calls.py's maps); ``r50``: ResNet-50 FPN shapes at 1333x800, batch 2 (bench/core_losses.py's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SHAPES = {"tiny": [(2, 16, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)],
          "r50": [(2, 256, 100, 168), (2, 256, 50, 84), (2, 256, 25, 42), (2, 256, 13, 21), (2, 256, 7, 11)]}


def formula(x, eps: float = 1e-5):
    """The standardisation as akd wrote it out before: batch mean and biased variance per channel."""
    import torch

    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    centred = x - mean
    return centred.div_(torch.sqrt(var + eps)) if not centred.requires_grad else centred / torch.sqrt(var + eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--bases", default="maskd,cwd,mgd")
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    import akd_cli.core.akd as akd_module
    from akd_cli import AKDLoss
    from akd_cli.core import BASE_LOSSES
    from akd_cli.core.uncertainty import standardise

    shapes = SHAPES[args.shapes]
    ways = (("formula", formula), ("batch norm", standardise))
    print("| base | formula | batch norm | change |\n|---|---|---|---|")
    for base in args.bases.split(","):
        torch.manual_seed(0)
        options = dict(channels=shapes[0][1], num_levels=len(shapes)) if BASE_LOSSES[base].needs_channels else {}
        if base == "maskd":
            options["student_masks_after"] = 1
        loss_fn = AKDLoss(base=base, num_avatars=1, uncertainty="release", **options)
        students = [torch.randn(s, requires_grad=True) for s in shapes]
        teachers = [torch.randn(s) for s in shapes]

        def step():
            loss_fn(students, teachers).backward()
            for s in students:
                s.grad = None

        times = {name: [] for name, _ in ways}
        for _ in range(2):  # warm-up, both ways
            for _, way in ways:
                akd_module.standardise = way
                step()
        for _ in range(args.repeats):
            for name, way in ways:
                akd_module.standardise = way
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        akd_module.standardise = standardise
        old, new = (1000 * statistics.median(times[name]) for name, _ in ways)
        print(f"| {base} | {old:.2f} ms | {new:.2f} ms | {100 * (new / old - 1):+.1f}% |")


if __name__ == "__main__":
    main()

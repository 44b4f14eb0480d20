"""Where a step of the AKD core spends its GPU time: torch.profiler's table of kernels for one
configuration (R50-FPN shapes at 1333x800, batch 2, as bench/core_losses.py), after warm-up.

    python bench/profile_core.py --base cwd --uncertainty paper --avatars 8 --avatar-kernel compiled [--hash-bits 64]

``--avatar-kernel compiled:unrolled`` (or ``:stacked``): the compiled passes, every one in that
layout of the Avatars (``akd_cli.core.fused.LAYOUT``; ``compiled`` alone: each base loss's own).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="cwd")
    parser.add_argument("--uncertainty", default="paper")
    parser.add_argument("--avatars", type=int, default=8)
    parser.add_argument("--avatar-kernel", default="compiled")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--hash-bits", type=int, choices=(32, 64), default=32,
                        help="the counter generator's hash width on CUDA (the same masks; 64: the int64 hash's cost)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from akd_cli import AKDLoss
    from akd_cli.core import BASE_LOSSES, counter_rng
    from core_losses import SHAPES, with_layout

    counter_rng.CUDA_HASH_BITS = args.hash_bits

    torch.manual_seed(0)
    kwargs = {"channels": 256, "num_levels": len(SHAPES)} if BASE_LOSSES[args.base].needs_channels else {}
    loss_fn = AKDLoss(base=args.base, num_avatars=args.avatars, uncertainty=args.uncertainty,
                      avatar_kernel=with_layout(args.avatar_kernel), **kwargs).cuda()
    student = [torch.randn(s, device="cuda", requires_grad=True) for s in SHAPES]
    teacher = [torch.randn(s, device="cuda") for s in SHAPES]

    def step():
        loss_fn(student, teacher).backward()
        for s in student:
            s.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(f"# {args.base}, {args.uncertainty} factor, {args.avatars} Avatars, {args.avatar_kernel}, "
          f"{args.hash_bits}-bit hash on CUDA; "
          f"{args.steps} steps (times are totals over them)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()

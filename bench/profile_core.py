"""Where a step of the AKD core spends its GPU time: torch.profiler's table of kernels for one
configuration (R50-FPN shapes at 1333x800, batch 2, as bench/core_losses.py), after warm-up.

    python bench/profile_core.py --base cwd --uncertainty paper --avatars 8 --avatar-kernel compiled [--hash-bits 64]

``--avatar-kernel compiled:unrolled`` (or ``:stacked``): the compiled passes, every one in that
layout of the Avatars (``akd_cli.core.fused.LAYOUT``; ``compiled`` alone: each base loss's own).

The last line sets a step's wall time (under the profiler) beside the GPU's busy time, the kernels'
own time summed: a loss whose GPU is busy a fraction of its wall time is bound by its host, and
its memory traffic (``bench/graph_loops.py --bytes``, counted without a GPU) says what the busy time
could fall to. ``--device cpu`` runs the same steps without a GPU (the wall time alone).
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
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--hash-bits", type=int, choices=(32, 64), default=32,
                        help="the counter generator's hash width on CUDA (the same masks; 64: the int64 hash's cost)")
    args = parser.parse_args()

    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from akd_cli import AKDLoss
    from akd_cli.core import BASE_LOSSES, counter_rng
    from core_losses import SHAPES, with_layout

    counter_rng.CUDA_HASH_BITS = args.hash_bits

    torch.manual_seed(0)
    kwargs = {"channels": 256, "num_levels": len(SHAPES)} if BASE_LOSSES[args.base].needs_channels else {}
    loss_fn = AKDLoss(base=args.base, num_avatars=args.avatars, uncertainty=args.uncertainty,
                      avatar_kernel=with_layout(args.avatar_kernel), **kwargs).to(args.device)
    student = [torch.randn(s, device=args.device, requires_grad=True) for s in SHAPES]
    teacher = [torch.randn(s, device=args.device) for s in SHAPES]
    cuda = args.device == "cuda"

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    def step():
        loss_fn(student, teacher).backward()
        for s in student:
            s.grad = None

    for _ in range(3):
        step()
    synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    print(f"# {args.base}, {args.uncertainty} factor, {args.avatars} Avatars, {args.avatar_kernel}, "
          f"{args.hash_bits}-bit hash on CUDA; "
          f"{args.steps} steps (times are totals over them)")
    print(averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=args.rows,
                         max_name_column_width=70))
    print(busy_line(wall, averages, args.steps, cuda))


def busy_line(wall: float, averages, steps: int, cuda: bool) -> str:
    """A step's wall time and, on a GPU, its kernels' summed time: each kernel's time is its events'
    self device time, counted once (as the table's "Self CUDA time total")."""
    line = f"per step: wall {wall / steps * 1e3:.2f} ms under the profiler"
    if cuda:
        # microseconds; torch before 2.4 names it for CUDA alone
        busy = sum(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
                   for event in averages) / 1e6
        line += f", GPU busy {busy / steps * 1e3:.2f} ms ({busy / wall:.0%} of the wall time)"
    return line


if __name__ == "__main__":
    main()

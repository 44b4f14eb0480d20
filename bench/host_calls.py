"""The AKD loss's host work: the time of one loss call (forward and backward) on tiny maps of five
FPN levels (2 x 16 channels, 32x32 down to 2x2), where the arithmetic is negligible and what is
timed is Python, dispatch, and the calls into compiled code. On a GPU this is the work the host
must do before the loss's kernels are queued: on an H100 the loss was bound by it, not by the GPU
(bench/RESULTS.md, issue 15).

Counts, per loss call, the calls into compiled code (each costs guards and wrappers), the torch
calls its forward makes (``per_level``; each a dispatch on the host, many a kernel launch on a
GPU; tensor metadata reads count too, a compiled call counts as one, the backward's calls are not
counted), the host's reads of a tensor's value (on a GPU, each waits for all queued work), and the
torch calls the loss makes after its last read: the work a read before them keeps from
overlapping the GPU's.

    python bench/host_calls.py [--device cpu|cuda] [--repeats 200] [--json out.json] [--root TREE] [--layouts]
                               [--only base/factor/kernel/avatars,...]

``--root`` imports akd_cli from another checkout (a git worktree of an older commit), to compare
two commits in one run on one machine. ``--layouts`` adds the compiled 8-Avatar rows with every
pass in each layout of the Avatars (``akd_cli.core.fused.LAYOUT``; minutes more of compilation). Plain
``compiled`` rows take each base loss's own layout (``fused.PASS_LAYOUTS``). ``--only`` keeps the rows
named (e.g. ``mse/release/loop/0,mse/release/compiled/8``): runs of two commits can then alternate,
a few minutes each, where this machine's noise between runs is larger than the changes timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SHAPES = [(2, 16, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]
CONFIGURATIONS = [  # (base, factor, kernel, Avatars)
    ("cwd", "paper", "loop", 0), ("cwd", "paper", "loop", 1), ("cwd", "paper", "loop", 8),
    ("cwd", "paper", "compiled", 1), ("cwd", "paper", "compiled", 8),
    ("maskd", "release", "loop", 0), ("maskd", "release", "loop", 1), ("maskd", "release", "loop", 8),
    ("maskd", "release", "compiled", 1), ("maskd", "release", "compiled", 8),
    ("mse", "release", "loop", 0), ("mse", "release", "compiled", 8),
]
FORCED = [("cwd", "paper", 8), ("maskd", "release", 8)]  # --layouts: these compiled rows in each layout too
READS = {"__bool__", "item", "__int__", "__float__", "__index__", "tolist"}


def tiny_loss(base: str, factor: str, kernel: str, avatars: int, device: str, shapes=SHAPES):
    """The loss of a configuration (seeded) with its students and teachers on the tiny maps of
    SHAPES, or on ``shapes`` (bench/graph_loops.py takes them too)."""
    import torch

    from akd_cli import AKDLoss

    torch.manual_seed(0)
    options = dict(channels=shapes[0][1], num_levels=len(shapes), student_masks_after=1) if base == "maskd" else {}
    loss_fn = AKDLoss(base=base, num_avatars=avatars, uncertainty=factor, avatar_kernel=kernel, **options).to(device)
    students = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    teachers = [torch.randn(s, device=device) for s in shapes]
    return loss_fn, students, teachers


def measure(base: str, factor: str, kernel: str, avatars: int, device: str, repeats: int) -> dict:
    import torch
    from torch.overrides import TorchFunctionMode

    from akd_cli.core import fused
    from core_losses import with_layout

    class Reads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.count = self.after = self.total = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.total += 1
            if getattr(func, "__name__", "") in READS:
                self.count, self.after = self.count + 1, 0
            else:
                self.after += 1
            return func(*args, **(kwargs or {}))

    loss_fn, students, teachers = tiny_loss(base, factor, with_layout(kernel), avatars, device)

    def step():
        loss_fn(students, teachers).backward()

    for _ in range(3):  # compiles; MasKD reads its warm-up count once
        step()
    calls = {"n": 0, "reads": None}

    def counting(compiled):
        def counted(*args, **kwargs):
            calls["n"] += 1
            if calls["reads"] is None:
                return compiled(*args, **kwargs)
            # Under the counting mode, dynamo would trace the compiled call anew (it guards on the
            # torch-function mode stack), which the loss never does; on CUDA that recompilation even
            # failed its own guard (torch 2.11). So the call runs outside the mode, counted as one.
            calls["reads"].after += 1
            calls["reads"].total += 1
            with torch.overrides._pop_mode_temporarily():
                return compiled(*args, **kwargs)
        return counted

    originals = dict(fused._compiled)
    fused._compiled.update({name: counting(compiled) for name, compiled in originals.items()})
    step()
    compiled_calls = calls["n"]
    with Reads() as reads:
        calls["reads"] = reads
        loss_fn.per_level(students, teachers)
    fused._compiled.update(originals)  # timed as the loss runs: no counting wrappers
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    q1, median, q3 = statistics.quantiles(times, n=4)
    return {"base": base, "factor": factor, "kernel": kernel, "avatars": avatars, "median_us": median * 1e6,
            "q1_us": q1 * 1e6, "q3_us": q3 * 1e6, "compiled_calls": compiled_calls, "reads": reads.count,
            "calls_after_last_read": reads.after, "torch_calls": reads.total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json")
    parser.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    parser.add_argument("--layouts", action="store_true",
                        help="also the compiled 8-Avatar rows with every pass in each layout (fused.LAYOUT)")
    parser.add_argument("--only", help="comma-separated rows base/factor/kernel/avatars (default: all)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.root))
    import torch._dynamo

    # One process meets twelve configurations, more than dynamo's default 8 compilations per function;
    # akd raises the limit for its passes since 8b84b0f, older checkouts do not: the same for both.
    torch._dynamo.config.recompile_limit = 64
    configurations = list(CONFIGURATIONS)
    if args.layouts:
        from akd_cli.core import fused

        configurations += [(base, factor, f"compiled:{layout}", avatars)
                           for base, factor, avatars in FORCED for layout in fused.LAYOUTS]
    if args.only:
        wanted = args.only.split(",")
        unknown = [name for name in wanted if name not in {"/".join(map(str, c)) for c in configurations}]
        if unknown:
            parser.error(f"no such row: {', '.join(unknown)}")
        configurations = [c for c in configurations if "/".join(map(str, c)) in wanted]
    rows = [measure(*configuration, device=args.device, repeats=args.repeats) for configuration in configurations]
    print("| base, factor | kernel | Avatars | host time per loss call (fwd+bwd), median [q1, q3] | compiled calls "
          "| torch calls (fwd) | reads | torch calls after the last read |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['base']}, {row['factor']} | {row['kernel']} | {row['avatars']} | {row['median_us']:.0f} us "
              f"[{row['q1_us']:.0f}, {row['q3_us']:.0f}] | {row['compiled_calls']} | {row['torch_calls']} "
              f"| {row['reads']} | {row['calls_after_last_read']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

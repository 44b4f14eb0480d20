"""How long the compiled Avatar passes take to compile: the first loss call (forward and backward)
of a fresh process with an empty inductor cache, against a later call, for a few configurations
on five FPN levels. The first training step of a run with ``--avatar-kernel compiled`` pays this
once per configuration (and the MasKD warm-up's switch to the student's masks once more).

    python bench/compile_time.py [--device cpu|cuda] [--shapes tiny|r50] [--root TREE] [--layout unrolled]

Each configuration runs in its own process with its own empty cache folder (what a fresh machine
has), so no compilation is found on disk. ``--layout`` puts every pass in that layout of the Avatars
(``akd_cli.core.fused.LAYOUT``; without it, each base loss's own: ``fused.PASS_LAYOUTS``).
``--root`` imports akd_cli from another checkout (a git worktree of an older commit), to compare
two commits on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from loss_pieces import SHAPES
CONFIGURATIONS = [("cwd", "paper", 8), ("mse", "release", 8), ("maskd", "release", 8), ("maskd", "release", 1)]


def measure(base: str, factor: str, avatars: int, device: str, shapes: list, layout: str = "") -> dict:
    import torch

    from akd_cli import AKDLoss
    from core_losses import with_layout

    with_layout("compiled:" + layout if layout else "compiled")

    torch.manual_seed(0)
    options = dict(channels=shapes[0][1], num_levels=len(shapes)) if base == "maskd" else {}
    loss_fn = AKDLoss(base=base, num_avatars=avatars, uncertainty=factor, avatar_kernel="compiled", **options).to(device)
    students = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    teachers = [torch.randn(s, device=device) for s in shapes]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss_fn(students, teachers).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"base": base, "factor": factor, "avatars": avatars, "first_s": times[0], "third_s": times[2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    parser.add_argument("--layout", default="",
                        help="every pass in this layout of the Avatars (akd_cli.core.fused.LAYOUTS); "
                             "default: each base loss's own")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, os.path.abspath(args.root))
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]), args.device, SHAPES[args.shapes], args.layout)))
        return 0
    print("| base, factor | Avatars | first call (compiles) | third call |")
    print("|---|---|---|---|")
    for base, factor, avatars in CONFIGURATIONS:
        with tempfile.TemporaryDirectory() as cache:
            out = subprocess.run([sys.executable, __file__, "--one", base, factor, str(avatars), "--device", args.device,
                                  "--shapes", args.shapes, "--root", args.root, "--layout", args.layout],
                                 capture_output=True, text=True,
                                 env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache))
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {base}, {factor} | {avatars} | {row['first_s']:.1f} s | {1000 * row['third_s']:.1f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the compiled Avatar passes generate: per compiled graph of one loss call (forward and
backward), the loops of inductor's CPU code, or the kernel launches of its GPU code. Tiny five-level
maps (as bench/host_calls.py), or R50-FPN's at 1333x800, batch 2 (``--shapes r50``, as
bench/core_losses.py): the code is compiled for dynamic shapes, but a few of inductor's choices read
the first call's sizes (whether a reduction splits in two).

On a GPU each launch costs host time, and the loss is bound by the host (bench/RESULTS.md). On the
CPU, inductor puts a graph's loops in one C++ function, so they cost no launches there; but their
count is a proxy for the GPU's launches (inductor's GPU code launches about one kernel per fused
node, where its CPU code writes one loop nest, or merges a few under one outer loop).

    python bench/graph_loops.py [--device cpu|cuda|triton] [--root TREE] mse/release/8 cwd/paper/8 ...

``--device triton``: no GPU, but the GPU's code form. Inductor writes Triton kernels for CPU tensors
and Triton's interpreter runs them (tests/triton_interpret.py, as tests/test_triton_interpret.py
uses it; needs the triton package); launches are counted as on a GPU. Inductor's heuristics that
read the device (a reduction with fewer outputs than twice the multiprocessors splits in two) read
the CPU's, 2 cores as 2 multiprocessors: ``--gpu-properties`` gives them an H100's (132), as a GPU
would. ``--no-run`` generates the kernels without running them (for ``--shapes r50``, whose kernels
the interpreter would take hours over). Inductor lowers a cat by the tensors' device: for CPU
tensors each input is copied into its slice (a launch each where the input is not computed in
place), where a GPU may write a cat of up to 8 pointwise inputs in one kernel.

    python bench/graph_loops.py --device triton --shapes r50 --no-run --gpu-properties mse/release/8

``--kernel compiled+combo``: the passes compiled with inductor's combo kernels (``fused.COMBO_KERNELS``),
``compiled:stacked`` or ``compiled:unrolled`` one layout for every pass (as bench/core_losses.py).

``--root`` imports akd_cli from another checkout (``git archive REV akd_cli | tar -x -C TREE``):
two commits' counts side by side. Compiles each configuration (minutes on the CPU for MasKD).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

def units(code: str) -> int:
    """Loop nests (CPU: each top-level ``#pragma omp for/single`` of the kernel sources) or Triton
    kernel launches (GPU, or ``--device triton``: each ``.run(`` of the graph's wrapper; external
    kernels, such as MasKD's matrix products, not counted). The GPU form has been run on Triton code
    under the interpreter (2026-11-27), not yet on a GPU."""
    if "@triton.jit" not in code:  # inductor's C++ code
        return len(re.findall(r"^ {8,12}#pragma omp (?:for|single)", code, re.M))
    return len(re.findall(r"\.run\(", code))


def role(code: str) -> str:
    """The graph's part of the call, from the AOT ID inductor writes at the top of its code
    (``# AOT ID: ['3_forward']``): f(orward), b(ackward), i(nference: no gradient), ? (no ID)."""
    found = re.search(r"^# AOT ID: \['\d+_(\w+)'\]", code, re.M)
    return found.group(1)[0] if found else "?"


def count(base: str, factor: str, avatars: int, device: str, shapes: list, kernel: str = "compiled") -> list:
    """(units, role) per compiled graph of one loss call, in compilation order."""
    from torch._inductor.utils import run_and_get_code

    from core_losses import with_layout
    from host_calls import tiny_loss

    loss_fn, students, teachers = tiny_loss(base, factor, with_layout(kernel), avatars, device, shapes)
    _, codes = run_and_get_code(lambda: loss_fn(students, teachers).backward())
    return [(units(code), role(code)) for code in codes]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configurations", nargs="+", help="base/factor/Avatars, e.g. mse/release/8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", choices=("tiny", "r50"), default="tiny")
    parser.add_argument("--no-run", action="store_true", help="--device triton: generate the kernels, run none")
    parser.add_argument("--gpu-properties", action="store_true",
                        help="--device triton: inductor's heuristics see an H100's 132 multiprocessors, not the CPU's cores")
    parser.add_argument("--kernel", default="compiled",
                        help="compiled[:LAYOUT][+combo], as bench/core_losses.py's --avatar-kernels takes it")
    parser.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    args = parser.parse_args(argv)
    # a graph served from inductor's cache brings no code to count
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    sys.path.insert(0, os.path.abspath(args.root))
    what = "loops" if args.device == "cpu" else "kernel launches"
    if args.device == "triton":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the generated kernels are loaded
        sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import triton_interpret

        triton_interpret.enable()  # after the path: it patches that checkout's akd_cli
        if args.gpu_properties:
            triton_interpret.as_h100()
        if args.no_run:
            triton_interpret.without_running()
        args.device = "cpu"  # the tensors' device; the code is Triton's all the same
    elif args.no_run or args.gpu_properties:
        parser.error("--no-run and --gpu-properties go with --device triton")
    from loss_pieces import SHAPES

    shapes = SHAPES[args.shapes]
    print(f"| base, factor, Avatars | {what} per compiled graph, in compilation order "
          "(f forward, b backward, i no gradient) | total |")
    print("|---|---|---|")
    for configuration in args.configurations:
        base, factor, avatars = configuration.split("/")
        per_graph = count(base, factor, int(avatars), args.device, shapes, args.kernel)
        listed = " ".join(f"{n}{r}" for n, r in per_graph)
        print(f"| {base}, {factor}, {avatars} | {listed} | {sum(n for n, _ in per_graph)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

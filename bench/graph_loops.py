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

``--bytes`` (with ``--device triton``, or ``cuda`` on a GPU): the memory traffic of one loss call, a floor on its GPU time
that launches and host work do not enter. The compiled graphs' launches by inductor's own estimate
per kernel (each buffer a kernel reads or writes counted once: a kernel that loops over its
reduction twice reads its input twice but is counted once, and such launches are counted beside
it), the ops outside the compiled graphs by a dispatch mode (each op's tensors in and out).
``base/factor/0`` is the plain loss, none of it compiled. The floor: the traffic at an H100 SXM's
nominal 3.35 TB/s. Without ``--no-run`` the kernels run under the interpreter, and what their
programs load and store is counted too (``ProgramTraffic``: no reuse between programs, an upper
bound; the tiny maps).

    python bench/graph_loops.py --device triton --shapes r50 --no-run --gpu-properties --bytes mse/release/0 mse/release/8

``--root`` imports akd_cli from another checkout (``git archive REV akd_cli | tar -x -C TREE``):
two commits' counts side by side. Compiles each configuration (minutes on the CPU for MasKD).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import NamedTuple


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


H100_BANDWIDTH = 3.35e12  # bytes/s, an H100 SXM's HBM3, nominal


def count(base: str, factor: str, avatars: int, device: str, shapes: list, kernel: str = "compiled") -> list:
    """(units, role) per compiled graph of one loss call, in compilation order."""
    return [(units(code), role(code)) for code in codes_of_one_call(base, factor, avatars, device, shapes, kernel)[0]]


def codes_of_one_call(base: str, factor: str, avatars: int, device: str, shapes: list, kernel: str):
    """The code of each graph compiled in one loss call (the first), and a function that makes
    another (on warm graphs: no compilation), the students' gradients set to None first."""
    from torch._inductor.utils import run_and_get_code

    from core_losses import with_layout
    from host_calls import tiny_loss

    loss_fn, students, teachers = tiny_loss(base, factor, with_layout(kernel), avatars, device, shapes)
    _, codes = run_and_get_code(lambda: loss_fn(students, teachers).backward())

    def again():
        for student in students:  # as a training step's zero_grad(set_to_none=True): no accumulation
            student.grad = None
        loss_fn(students, teachers).backward()

    return codes, again


def estimate_kernel_bytes():
    """Inductor writes each Triton kernel's estimated traffic (``'kernel_num_gb'`` in its
    ``inductor_meta``) only under ``benchmark_kernel``, which also appends a benchmark harness to
    each kernel's source; for the CPU's Triton (``--device triton``) torch 2.13 writes that
    harness's imports indented, and the kernel's module fails to import. The estimate, no harness."""
    from torch._inductor import config
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.utils import IndentedBuffer

    kernels = [TritonKernel]
    try:
        from torch._inductor.codegen.triton_combo_kernel import ComboKernel

        kernels.append(ComboKernel)
    except ImportError:  # a torch without combo kernels
        pass
    for kernel in kernels:
        kernel.imports_for_benchmark_kernel = lambda self: ""
        kernel.codegen_kernel_benchmark = lambda self, num_gb=None: IndentedBuffer()
    config.benchmark_kernel = True


KERNEL_SOURCE = re.compile(r"^(\w+) = async_compile\.triton\('\w+', '''(.*?)'''", re.M | re.S)


SMALL_LAUNCH = 1e6  # bytes: under 0.3 us at an H100's bandwidth, a tenth of a launch's own latency


class Launched(NamedTuple):
    """One graph's Triton launches, by each kernel's ``kernel_num_gb``. ``reread``: the bytes if
    each loop over a kernel's reduction read its buffers again, an upper bound (a later loop reads
    some inputs again, a softmax's max then its sum, not all, and writes its outputs once)."""
    bytes: float = 0.0
    reread: float = 0.0
    unestimated: int = 0  # launches of kernels without an estimate
    looped: int = 0  # launches of kernels that loop over their reduction more than once
    small: int = 0  # launches moving under SMALL_LAUNCH: bound by their latency, not by memory

    def __add__(self, other):
        return Launched(*(a + b for a, b in zip(self, other)))


def launched_bytes(code: str) -> Launched:
    sources = dict(KERNEL_SOURCE.findall(code))
    total = Launched()
    for name in re.findall(r"^\s*(\w+)\.run\(", code, re.M):
        source = sources.get(name, "")
        found = re.search(r"'kernel_num_gb': ([0-9.eE+-]+)", source)
        loops = len(re.findall(r"^\s*for r\d_offset in ", source, re.M))
        moved = float(found.group(1)) * 1e9 if found else 0.0
        total += Launched(moved, moved * max(loops, 1), int(not found), int(loops > 1), int(bool(found) and moved < SMALL_LAUNCH))
    return total


def eager_bytes(call) -> tuple:
    """(bytes, ops, ops moving under SMALL_LAUNCH, (op, bytes) from the most) of the ops ``call``
    runs outside the compiled graphs' Triton kernels: each op's tensors in and out, views and
    allocations left out; an op so counted is about one kernel launch on a GPU. Dynamo refuses to
    compile under a dispatch mode unless the mode ignores compiled code; this one does, so the
    graphs are compiled as without it, and launched_bytes counts their kernels. The mode is on while
    a compiled graph runs, and sees the ops its wrapper calls beside its Triton kernels (extern
    kernels: MasKD's matrix products, a batch norm), real traffic those kernels' estimates leave
    out. A read of a scalar to the host (``.item()``, the loss's one device read) is a copy, not a
    kernel: not counted; the wrapper of the CPU's Triton code makes dozens of them, for sizes a
    GPU's wrapper holds as integers."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Traffic(TorchDispatchMode):
        @classmethod
        def ignore_compile_internals(cls):
            return True

        def __init__(self):
            super().__init__()
            self.per_op = {}
            self.ops = self.small = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and not func.__name__.startswith(("empty", "_local_scalar_dense")):
                moved = sum(x.numel() * x.element_size() for x in tree_leaves((args, kwargs, out))
                            if isinstance(x, torch.Tensor))
                name = func.__name__.split(".")[0]
                self.per_op[name] = self.per_op.get(name, 0) + moved
                self.ops += 1
                self.small += moved < SMALL_LAUNCH
            return out

    with Traffic() as traffic:
        call()
    ranked = sorted(traffic.per_op.items(), key=lambda item: -item[1])
    return sum(traffic.per_op.values()), traffic.ops, traffic.small, ranked


class ProgramTraffic:
    """The bytes the kernels' programs load and store as Triton's interpreter runs them: per load or
    store of one program, its distinct addresses. No reuse between programs is assumed, so where
    programs read the same data (a map read once per Avatar, each in its own programs) each read
    counts: an upper bound where inductor's estimate (each buffer once per kernel) is a lower one.
    Runs the kernels (not with ``--no-run``): the tiny maps, in minutes."""

    def __enter__(self):
        import numpy as np
        from triton.runtime import interpreter

        self.bytes = 0
        builder = interpreter.InterpreterBuilder
        self._saved = load, store = builder.create_masked_load, builder.create_masked_store

        def distinct(ptrs, mask) -> int:
            return np.unique(np.broadcast_to(ptrs.data, mask.data.shape)[mask.data]).size

        def counted_load(this, ptrs, mask, *rest):
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            self.bytes += distinct(ptrs, mask) * size
            return load(this, ptrs, mask, *rest)

        def counted_store(this, ptrs, value, mask, *rest):
            self.bytes += distinct(ptrs, mask) * value.data.dtype.itemsize
            return store(this, ptrs, value, mask, *rest)

        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        return self

    def __exit__(self, *_):
        from triton.runtime import interpreter

        interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store = self._saved


def print_bytes(configurations: list, device: str, shapes: list, kernel: str, interpreted: bool = True,
                run: bool = False) -> int:
    """A row per configuration: the compiled graphs' launches and traffic, the ops outside them and
    their traffic, and the floor of the whole at an H100's bandwidth. ``interpreted``: the kernels
    are Triton's interpreter's (``--device triton``), not a GPU's; ``run``: they run under it, and
    what their programs load and store is counted too."""
    if interpreted:
        import triton_interpret  # on the path main() gave it
    estimate_kernel_bytes()
    small = f"{SMALL_LAUNCH / 1e6:.0f} MB"
    print(f"| base, factor, Avatars | launches | of them under {small} | compiled graphs, MB | launches looping twice or more "
          f"| ops outside them (under {small}) | their MB (most) | total, MB "
          f"| floor at {H100_BANDWIDTH / 1e12:.2f} TB/s (if each loop read again) |"
          + (" kernels' programs, MB (no reuse between programs) | its floor |" if run else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if run else ""))
    for configuration in configurations:
        base, factor, avatars = configuration.split("/")
        codes, again = codes_of_one_call(base, factor, int(avatars), device, shapes, kernel)
        launched = sum((launched_bytes(code) for code in codes), Launched())
        compiled, reread, unknown = launched.bytes, launched.reread, launched.unestimated
        if run:
            with ProgramTraffic() as programs:
                again()
        # the interpreter's own torch calls (the kernels' arguments to numpy and back) are no
        # kernels: the ops outside are counted with the kernels not run
        with triton_interpret.not_running() if interpreted else contextlib.nullcontext():
            outside, ops, small_ops, ranked = eager_bytes(again)
        most = ", ".join(f"{name} {moved / 1e6:.0f}" for name, moved in ranked[:3] if moved >= 1e5) or "-"
        unestimated = f" ({unknown} launches without an estimate)" if unknown else ""
        total = compiled + outside
        upper = (f" (to {(reread + outside) / 1e6:.0f} MB, {(reread + outside) / H100_BANDWIDTH * 1e6:.0f} us)"
                 if reread > compiled else "")
        print(f"| {base}, {factor}, {avatars} | {sum(units(code) for code in codes)} | {launched.small} "
              f"| {compiled / 1e6:.1f}{unestimated} | {launched.looped} | {ops} ({small_ops}) | {outside / 1e6:.1f} ({most}) "
              f"| {total / 1e6:.1f} | {total / H100_BANDWIDTH * 1e6:.0f} us{upper} |"
              + (f" {programs.bytes / 1e6:.1f} | {(programs.bytes + outside) / H100_BANDWIDTH * 1e6:.0f} us |" if run else ""),
              flush=True)
    return 0


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
    parser.add_argument("--bytes", action="store_true",
                        help="--device triton or cuda: each call's memory traffic (inductor's estimate per kernel, "
                             "the ops outside the compiled graphs by a dispatch mode) and its floor at an H100's bandwidth")
    parser.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    args = parser.parse_args(argv)
    # a graph served from inductor's cache brings no code to count
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    sys.path.insert(0, os.path.abspath(args.root))
    what = "loops" if args.device == "cpu" else "kernel launches"
    interpreted = args.device == "triton"
    if interpreted:
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
    if args.bytes and args.device == "cpu" and not interpreted:
        parser.error("--bytes counts Triton kernels: --device triton (no GPU) or cuda")
    from loss_pieces import SHAPES

    shapes = SHAPES[args.shapes]
    if args.bytes:
        return print_bytes(args.configurations, args.device, shapes, args.kernel, interpreted=interpreted,
                           run=interpreted and not args.no_run)
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

"""Inductor's Triton code, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

The compiled Avatar passes become Triton kernels on a GPU and C++ on the CPU; test_fused.py checks
the C++ and test_cuda.py the Triton code, which needs a GPU. This module lets a process without one
run the Triton code: inductor generates Triton for CPU tensors (``cpu_backend="triton"``), and
Triton's interpreter executes each kernel with numpy, program by program. What it checks is what
the GPU's kernels compute (the int32 wrapping hash, the casts, the reductions as Triton writes them)
and which buffers the generated code allocates; not their speed.

tests/test_triton_interpret.py runs test_fused.py's compiled cases so, in a child process:
``enable()`` must run before anything is compiled, and TRITON_INTERPRET=1 must be set before triton
is imported. Each patch below says why it is needed. Only one touches akd_cli: the hash takes the
GPU's width (counter_rng.hash_bits); the others patch inductor and the interpreter.
"""
import contextlib
import math

import numpy as np


def enable():
    import torch
    import triton.language as tl
    from torch._inductor import config
    from torch._inductor.runtime import triton_helpers, triton_heuristics
    from triton.backends.compiler import GPUTarget
    from triton.runtime import interpreter
    from triton.runtime.driver import driver

    from akd_cli.core import counter_rng

    config.cpu_backend = "triton"

    # Inductor asks the active driver which target it generates code for; without a GPU Triton finds
    # no driver at all, and the interpreter itself needs none. An H100's target: what the code would
    # be generated for there.
    class InterpreterDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, *_):
            return 0

    driver.set_active(InterpreterDriver())

    # Inductor's kernels call CUDA's libdevice for exp, rsqrt, isnan...; the interpreter has no
    # libdevice (its stubs return None) but interprets tl.math's functions of the same names. tl.math
    # has no isnan or isinf (written here as comparisons) and no pow (numpy's, on the blocks' data).
    class Libdevice:
        def __getattr__(self, name):
            return getattr(tl.math, name)

        @staticmethod
        def isnan(x):
            return x != x

        @staticmethod
        def isinf(x):
            return (x == float("inf")) | (x == float("-inf"))

        @staticmethod
        def pow(x, y):  # numpy's power on the blocks' data, in x's dtype
            x, y = (v if isinstance(v, tl.tensor) else tl.full([], v, tl.float32) for v in (x, y))
            x, y = tl.broadcast(x, y)
            data = np.power(x.handle.data, y.handle.data).astype(x.handle.data.dtype)
            return tl.tensor(interpreter.TensorHandle(data, x.dtype.scalar), x.type)

    triton_helpers.libdevice = Libdevice()

    # The interpreter reduces with a combine function of inductor's own (max2, welford) one element
    # at a time in Python: minutes per test. A tree of whole-block combines gives the same result,
    # up to the order of floating-point rounding (tl.reduce's combine functions are associative and
    # commutative: a GPU's warps combine in a tree too), in log2(n) interpreted calls. (Triton 3.6's
    # to 3.9's interpreters have this method; another keeps its own, slower, reduction.)
    original = getattr(getattr(interpreter, "ReduceOps", None), "generic_reduce", None)
    if original is not None:
        interpreter.ReduceOps.generic_reduce = lambda self, input: _tree_reduce(self, input, original, tl)

    # The interpreter runs a kernel's programs one after another, each a few numpy calls per
    # operation, and runs a kernel's first autotuning config. Inductor lists the smallest blocks
    # first (one row per program for a persistent reduction): thousands of programs for a map of a
    # few thousand elements. Its configs differ in block sizes, not in what they compute (a GPU
    # may pick any of them), so the largest comes first here.
    initialise = triton_heuristics.CachingAutotuner.__init__

    def largest_blocks_first(self, fn, triton_meta, configs, *args, **kwargs):
        configs = sorted(configs, key=lambda c: -math.prod(v for k, v in c.kwargs.items() if k.endswith("BLOCK")))
        initialise(self, fn, triton_meta, configs, *args, **kwargs)

    triton_heuristics.CachingAutotuner.__init__ = largest_blocks_first

    # The GPU hashes in wrapping int32 (counter_rng.hash_bits); the CPU's int64 is the default here.
    # The Triton code under test is the GPU's: the same bits in either width, but other operations.
    counter_rng.hash_bits = lambda device: 32

    # Inductor's combo kernels (fused.COMBO_KERNELS) group a graph's independent kernels per device,
    # and leave out the CPU's: C++ loops cost no launches. Its grouping, run on nodes that answer a
    # GPU's device, groups these CPU tensors' Triton kernels as it would a GPU's. (Torch 2.13's
    # scheduler; one without combo kernels keeps its own.)
    from torch._inductor import scheduler

    foreach = getattr(scheduler, "ForeachKernelSchedulerNode", None)
    grouping = getattr(foreach, "group_algorithm_for_combo_kernels", None)
    if grouping is not None:
        cuda = torch.device("cuda", 0)

        def as_a_gpus(sched):
            nodes = list(sched.nodes)
            for node in nodes:
                node.get_device = lambda: cuda
            try:
                return grouping(sched)
            finally:
                for node in nodes:
                    del node.get_device

        foreach.set_group_algorithm_for_combo_kernels(as_a_gpus)


def as_h100():
    """Inductor's heuristics read the device's properties: a reduction with fewer outputs than twice
    the multiprocessors splits in two (``reduction_split_factor``). For CPU tensors they read the
    CPU's, its cores as multiprocessors (2 here): an H100's instead (132), for counting the launches
    a GPU would make at real sizes (bench/graph_loops.py --gpu-properties). Not for the tests: the
    interpreter runs the code all the same, only the choices move."""
    from torch._inductor.runtime.hints import DeviceProperties

    h100 = dict(multi_processor_count=132, cc=90, major=9, regs_per_multiprocessor=65536,
                max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32)
    DeviceProperties.create = classmethod(lambda cls, device: cls(type=device.type, index=device.index, **h100))


def without_running():
    """The kernels generated but not run (each launch a no-op; the values are garbage): the generated
    code alone, at sizes whose kernels the interpreter would take hours over (bench/graph_loops.py
    --no-run)."""
    from triton.runtime import interpreter

    interpreter.GridExecutor.__call__ = lambda self, *args, **kwargs: None


@contextlib.contextmanager
def not_running():
    """without_running() for the block inside only (bench/graph_loops.py: the torch calls a loss
    makes outside its kernels, without those the interpreter makes to run them)."""
    from triton.runtime import interpreter

    saved = interpreter.GridExecutor.__call__
    without_running()
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = saved


def _tree_reduce(self, input, original, tl):
    original_axis = self.axis
    tensors, axis = self.unravel(input, self.axis)
    data = [t.handle.data for t in tensors]
    dtypes = [t.dtype for t in tensors]
    size = data[0].shape[axis]
    if size == 0:
        return original(self, input)
    while size > 1:
        half = size // 2
        left = [self.to_tensor(np.take(d, range(half), axis=axis), t) for d, t in zip(data, dtypes)]
        right = [self.to_tensor(np.take(d, range(half, 2 * half), axis=axis), t) for d, t in zip(data, dtypes)]
        combined = self.combine_fn.fn(*left, *right)
        combined = combined if isinstance(combined, tuple) else (combined,)
        merged = []
        for d, c in zip(data, combined):
            c = np.broadcast_to(c.handle.data if isinstance(c, tl.core.tensor) else c, left[0].handle.data.shape)
            parts = [c.astype(d.dtype)] + ([np.take(d, [size - 1], axis=axis)] if size % 2 else [])
            merged.append(np.concatenate(parts, axis=axis))
        data, size = merged, merged[0].shape[axis]
    out = []
    for d, t in zip(data, dtypes):
        d = np.take(d, 0, axis=axis)
        if self.keep_dims:
            d = np.expand_dims(d, axis) if original_axis is not None else d.reshape((1,) * len(tensors[0].shape))
        elif original_axis is None:
            d = d.item()
        out.append(self.to_tensor(d, t))
    return out

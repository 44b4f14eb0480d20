"""Peak memory of one step after warm-up, for the benchmarks: the same measure on the CPU and CUDA.

On CUDA, ``torch.cuda.max_memory_allocated`` after a reset. On the CPU, the process's peak RSS
after Linux resets it (writing 5 to /proc/self/clear_refs): a compiled kernel's compilation in the
warm-up steps is then not counted. Without /proc (not Linux), the peak is the process's whole,
warm-up included.
"""
from __future__ import annotations

import resource

# glibc raises its mmap threshold after large frees and keeps later large buffers on the heap, so a
# process's peak RSS would count freed memory. A fixed threshold returns large buffers to the OS on
# free: peak RSS then follows the live tensors (CPU only; CUDA uses max_memory_allocated). It makes
# large allocations slower, so a process with it must not be timed.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak(device: str) -> int:
    """Start a peak measurement; returns the bytes in use now, which the peak is taken over."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_bytes(device: str) -> int:
    """The peak since ``_reset_peak`` (bytes)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_peak(step, device: str) -> int:
    """Bytes that one call of ``step`` adds at its peak over the memory in use before it."""
    before = _reset_peak(device)
    step()
    return _peak_bytes(device) - before

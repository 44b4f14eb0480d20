"""A counter-based generator for dropout masks: the keep bit of element i of Avatar k is a pure
function of (seed, k, i), so a second pass over the teacher regenerates exactly the mask the
first drew, and a compiled kernel draws it in registers without ever storing it.

torch's own dropout cannot do that: its masks come from a stateful generator (Philox on CUDA,
Mersenne Twister on the CPU) whose stream a kernel cannot re-enter at element i, and inductor's
in-kernel random numbers differ from eager mode's. This generator is integer arithmetic only, so
eager mode, inductor's C++ code on the CPU and its Triton code on a GPU give the same bits.

The element hash is lowbias32 (C. Wellons, "Hash function prospector", 2018) of the index and a
seed key; each Avatar then xors its own key and multiplies by its own odd number (see keep_mask).
The per-element hash runs in one of two representations of the same uint32 values, which give
the same bits (tests/test_fused.py checks that they agree):

- int64 (the CPU's): values below 2^32, every product below 2^63 (lowbias32's second multiplier
  is split into 16-bit halves), so no product overflows; a C++ compiler may assume signed
  overflow away, which rules out wrapping int32 products in inductor's C++ code;
- int32 (CUDA's): products wrap mod 2^32, as the GPU's integer multiply and Triton's do, and
  shifts are made logical by masking off the sign's copies. A GPU emulates 64-bit multiplies
  with several 32-bit ones: on an H100 the int64 hash was most of the passes' GPU time. Its
  counter is an int32 arange, so a map of 2^31 elements or more (8 GiB in float32) takes int64.

The keep test compares the top 24 bits with round(p * 2^24): the dropout rate is quantised to 2^-24
(0.1 becomes 0.1000000238). Masks drawn so are not torch's: a run with avatar_rng="counter" draws
other (equally distributed) Avatars than one with torch's dropout, as two seeds do.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

_M32 = 0xFFFFFFFF
_MULTIPLIER_INT32 = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9
SEED_HIGH = 2 ** 31 - 1


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = ((((x * 0x846C) & 0xFFFF) << 16) + x * 0xA68B) & _M32  # x * 0x846CA68B mod 2^32
    return x ^ (x >> 16)


def draw_seed(device: torch.device, shape=()) -> torch.Tensor:
    """int64 seeds (one, 0-d, by default) from torch's generator on ``device``: reproducible under
    torch.manual_seed, and on a GPU they stay there (no host synchronisation)."""
    return torch.randint(SEED_HIGH, tuple(shape), device=device, dtype=torch.int64)


def avatar_keys(seed: torch.Tensor, indices: torch.Tensor):
    """(the seed's key, each Avatar's key, each Avatar's odd multiplier < 2^31): int64 tensors."""
    seed_key = mix32(mix32(seed & _M32))
    key = mix32(mix32((seed + _GOLDEN * (indices + 1)) & _M32))
    return seed_key, key, (mix32(key ^ 0x5BD1E995) & 0x7FFFFFFF) | 1


def threshold(drop_rate: float) -> int:
    return int(round(float(drop_rate) * (1 << 24)))


class Drop(NamedTuple):
    """A dropout rate as the masks and the compiled passes take it: the rate (the survivors' scale,
    1 / (1 - rate)) and its keep threshold, the latter computed here, in plain Python.

    Computed inside a compiled function from a float argument, the threshold made dynamo
    specialise on the rate (a guard ``round(2^24 * rate) == t``) while the rate stayed a graph
    input; inductor's FX graph cache then handed a recompilation for another rate the code of the
    first, in the same process and in any later one sharing the cache: Avatars drawn at the first
    rate, silently (torch 2.11 and 2.13; tests/test_fused.py holds the case). As an int argument
    the threshold is a kernel argument like the rate, with no guard to lose."""
    rate: float
    threshold: int

    @classmethod
    def of(cls, rate: float) -> "Drop":
        return cls(float(rate), threshold(rate))


def mix32_wrapping(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors holding uint32 bits: products wrap mod 2^32; the masks after each
    right shift clear what the sign bit copied in (logical shifts); the second multiplier is
    0x846CA68B written as the int32 with its bits, a constant Triton can hold."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MULTIPLIER_INT32
    return x ^ ((x >> 16) & 0xFFFF)


# Not a user option (both widths give the same masks): bench/profile_core.py sets 64 to time the
# int64 hash against the int32 one on a GPU.
CUDA_HASH_BITS = 32


def hash_bits(device: torch.device) -> int:
    """The per-element hash's integer width on ``device``: 32 (wrapping) on CUDA, 64 elsewhere."""
    return CUDA_HASH_BITS if device.type == "cuda" else 64


def keep_mask(shape, keys, drop: Drop, bits: Optional[int] = None) -> torch.Tensor:
    """Keep bits of shape ``K + shape`` for ``keys = avatar_keys(seed, indices)`` (K = indices' shape).

    Element i of Avatar k is kept iff the top 24 bits of ((h_i ^ key_k) * mult_k) mod 2^32 reach
    round(p * 2^24) (``drop.threshold``), with h_i = mix32(i ^ seed_key): probability 1 - p. Each
    step is a bijection of a uniform value, and no value is used twice after the element hash: a
    compiler computes each Avatar's bit in registers (deeper xorshift chains per Avatar made inductor
    store a K-fold intermediate, or made its inlining time explode). The keys are computed
    beforehand: a compiled caller takes them as inputs, so their hashing does not count towards the
    per-element expression.
    """
    seed_key, key, mult = keys
    hashed = element_hash(shape, seed_key, bits or hash_bits(key.device))
    lead = (...,) + (None,) * len(shape)
    return keep_bits(hashed, key[lead], mult[lead], drop)


class ElementHash(NamedTuple):
    """h_i = mix32(i ^ seed_key) of every element of a map, in the width ``keep_mask`` chose: what
    all Avatars of a level share. Their own steps (``keep_bits``) are one xor and one multiply."""
    value: torch.Tensor
    bits: int


def element_hash(shape, seed_key: torch.Tensor, bits: int) -> ElementHash:
    """The per-element hash of a map of ``shape`` (``bits``: 32 wrapping, or 64), from the level's
    seed key (0-d)."""
    numel = 1
    for size in shape:  # a plain loop: torch.compile traces it (not a generator into math.prod)
        numel *= int(size)
    if bits == 32 and numel < 2 ** 31:
        # int64 -> int32 keeps the low 32 bits: the same uint32 values, two's complement
        counter = torch.arange(numel, device=seed_key.device, dtype=torch.int32).view(*shape)
        return ElementHash(mix32_wrapping(counter ^ seed_key.to(torch.int32)), 32)
    counter = torch.arange(numel, device=seed_key.device, dtype=torch.int64).view(*shape) & _M32
    return ElementHash(mix32(counter ^ seed_key), 64)


def keep_bits(hashed: ElementHash, key: torch.Tensor, mult: torch.Tensor, drop: Drop) -> torch.Tensor:
    """One Avatar's keep bits (or several, with ``key`` and ``mult`` broadcast against the map) from
    the shared element hash."""
    if hashed.bits == 32:
        mixed = (hashed.value ^ key.to(torch.int32)) * mult.to(torch.int32)
        return ((mixed >> 8) & 0xFFFFFF) >= drop.threshold
    mixed = ((hashed.value ^ key) * mult) & _M32
    return (mixed >> 8) >= drop.threshold


def dropout(teacher: torch.Tensor, keep: torch.Tensor, drop: Drop) -> torch.Tensor:
    """Inverted dropout with given keep bits; one expression for the loop and the fused passes, so
    both compute each Avatar element with the same float operations."""
    return teacher * (keep.to(teacher.dtype) * (1.0 / (1.0 - drop.rate)))

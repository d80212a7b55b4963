"""Counter-based random numbers: every value is a pure function of integer keys, computed batched on any device.

A stateful ``torch.Generator`` hands out numbers in call order, so a sample's augmentation would depend on
where it sits in a batch, on the batch size and on the number of processes. Here a sample's numbers are
``splitmix64`` hashes of (seed, epoch, view, sample index, draw number), so any sample can be (re)drawn alone,
in any batch, on CPU or CUDA, with bit-identical results.

Torch has no unsigned 64-bit arithmetic on every device, so the hash runs on int64: additions and
multiplications wrap modulo 2**64 exactly as uint64 would, but ``>>`` copies the sign bit, so logical right
shifts mask the copied bits away.
"""

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: 2**64 / golden ratio, odd
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _int64(value: int) -> int:
    """The int64 with the same 64 bits as ``value`` mod 2**64 (torch scalars must fit int64)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors: a bijection of 64-bit words that scrambles every input bit."""
    x = (x ^ _shift_right(x, 30)) * _int64(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _int64(_MIX2)
    return x ^ _shift_right(x, 31)


def counter_keys(indices: Tensor, *counters: int) -> Tensor:
    """One int64 key per index (int64 (N,) on any device) for the integer counters, e.g. (seed, epoch, view)."""
    prefix = torch.tensor(len(counters), dtype=torch.int64)  # separates tuples of different lengths
    for counter in counters:
        prefix = mix64(prefix + _int64(counter * _GOLDEN))
    # The prefix is a CPU scalar, so .item() never waits on an accelerator. Distinct indices give distinct
    # keys: multiplying by an odd constant and mix64 are both bijections of 64-bit words.
    return mix64(indices.to(torch.int64) * _int64(_GOLDEN) + prefix.item())


def permutation(count: int, *counters: int, device: torch.device | str = "cpu") -> Tensor:
    """A random permutation of ``range(count)`` (int64) that depends on the counters alone, on any device."""
    return counter_keys(torch.arange(count, device=device), *counters).argsort()


def uniform(keys: Tensor, count: int) -> Tensor:
    """(B, count) float32 uniform in [0, 1): draws ``1..count`` of each key, in one batched hash."""
    draws = torch.arange(1, count + 1, device=keys.device, dtype=torch.int64)
    bits = mix64(keys[:, None] + draws * _int64(_GOLDEN))
    # The top 24 bits fill float32's mantissa exactly: values k / 2**24, never 1.0.
    return _shift_right(bits, 40).to(torch.float32) * (1.0 / (1 << 24))

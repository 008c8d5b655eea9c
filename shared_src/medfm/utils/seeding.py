"""Seeds derived from a run's seed and a position in the run (epoch, iteration, sample index)."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys`` (e.g. ``(seed, epoch, index)`` or ``(seed, rank, iteration)``).

    The keys go through NumPy's ``SeedSequence`` hash, so neighbouring keys give unrelated streams (unlike
    ``seed + step``). The same keys give the same seed in any process, which is what makes a resumed run draw
    what the uninterrupted run drew.

    Args:
        keys: non-negative integers.

    Raises:
        ValueError: a key is negative or not an integer.
    """
    ints = []
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {k!r} in {keys}.")
        ints.append(int(k))
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])

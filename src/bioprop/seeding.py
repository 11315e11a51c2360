"""The one way bioprop derives a seed from other seeds and names.

Every random stream in bioprop (per-layer feedback draws, redraws, weight-mirror noise, data order, per-epoch
and per-rank streams) gets its seed from :func:`derive_seed`, so that streams never collide the way ``seed +
k`` formulas do, and so that a stream is a pure function of its parts: the same on every device, every DDP
rank that asks for it, and after a resume.

This module imports nothing from bioprop: every other layer may use it.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed", "SEED_BITS"]

#: Derived seeds lie in [0, 2**SEED_BITS); every generator bioprop uses (torch, NumPy, Python) accepts them.
SEED_BITS = 64


def _word(part: int | str) -> int:
    if isinstance(part, bool) or not isinstance(part, (int, np.integer, str)):
        raise TypeError(f"seed parts must be ints or strings, got {type(part).__name__}")
    if isinstance(part, str):
        # Strings become a 64-bit word of their BLAKE2b digest, with bit 64 set so no string equals an int.
        return int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little") | (1 << 64)
    return int(part) % (1 << 64)


def derive_seed(*parts: int | str) -> int:
    """A well-mixed 64-bit seed that depends only on ``parts`` (ints and strings), in order.

    ``derive_seed(seed, epoch, stream)`` with plain non-negative ints equals
    ``np.random.SeedSequence([seed, epoch, stream]).generate_state(1, np.uint64)[0]``; negative ints are taken
    modulo 2**64, strings are hashed (so ``derive_seed(seed, "layer1.weight")`` gives a per-layer stream).

    Raises:
        TypeError: a part is not an int or a string.
    """
    if not parts:
        raise TypeError("derive_seed needs at least one part")
    words = [_word(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])

"""Stable seeds derived from names and numbers.

Everything random in dynaslice (batches, augmentation, sampled subnets, dropout masks, Gumbel
noise) is a function of a seed derived here from ``(purpose, seed, step, ...)``. That is what
makes every rank of a DDP job draw the same subnets without communicating, and a run resumed
from any checkpoint continue bit for bit.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts``; stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)

"""Seeds of the reproducible random streams: one 63-bit seed per tuple of integers."""

from __future__ import annotations

import zlib

import numpy as np


def seed_for(*parts: int) -> int:
    """A 63-bit seed that differs for every tuple of integers, e.g. (seed, worker, batch index).

    The low 32 bits are the CRC-32 of the parts as int64; the high bits are ``parts[0] mod 2**31``.
    """
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) | (int(parts[0]) % (2**31)) << 32

"""Small shared helpers: per-sample randomness, atomic files, image conversion."""

from equidiff.utils.images import to_uint8, uint8_to_float
from equidiff.utils.io import atomic_write, atomic_write_bytes
from equidiff.utils.rng import generators_for, randn_per_sample

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "generators_for",
    "randn_per_sample",
    "to_uint8",
    "uint8_to_float",
]

"""Lossless integer coding for sorted top-k token ids: gaps, Elias-gamma classes, bit packing.

A set of k distinct token ids, sorted ascending, is described by its gaps
`g_j = id_j - id_{j-1} - 1` (with `id_{-1} = -1`), all >= 0. Each `g + 1 >= 1` is split the
Elias-gamma way into a class `c = floor(log2(g + 1))` and a remainder of exactly `c` bits,
`g + 1 - 2**c`. The classes are small and skewed (they go to a general-purpose entropy
coder); the remainders are close to uniform, so they are bit-packed as they are.

Everything here is vectorized numpy and exact; `tests/engine/test_cache_codec.py` checks round trips.
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 56  # a value plus its offset inside a byte must fit a 64-bit window


def sorted_ids_to_gaps(sorted_ids: np.ndarray) -> np.ndarray:
    """Gaps between consecutive ids along the last axis; the ids must be strictly increasing and >= 0."""
    ids = np.asarray(sorted_ids, dtype=np.int64)
    previous = np.concatenate([np.full(ids.shape[:-1] + (1,), -1, dtype=np.int64), ids[..., :-1]], axis=-1)
    gaps = ids - previous - 1
    if gaps.size and gaps.min() < 0:
        raise ValueError("token ids must be distinct, non-negative and sorted ascending along the last axis")
    return gaps


def gaps_to_sorted_ids(gaps: np.ndarray) -> np.ndarray:
    """Inverse of `sorted_ids_to_gaps`."""
    return np.cumsum(np.asarray(gaps, dtype=np.int64) + 1, axis=-1) - 1


def gamma_split(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split gaps (>= 0) into Elias-gamma classes (uint8) and remainders (int64, `class` bits each)."""
    shifted = np.asarray(gaps, dtype=np.int64) + 1
    if shifted.size and shifted.min() < 1:
        raise ValueError("gaps must be >= 0")
    # frexp is exact for integers below 2**53: shifted = mantissa * 2**exponent, mantissa in [0.5, 1)
    classes = (np.frexp(shifted.astype(np.float64))[1] - 1).astype(np.int64)
    if classes.size and classes.max() > MAX_WIDTH:
        raise ValueError(f"gap too large to code: needs more than {MAX_WIDTH} bits")
    remainders = shifted - (np.int64(1) << classes)
    return classes.astype(np.uint8), remainders


def gamma_join(classes: np.ndarray, remainders: np.ndarray) -> np.ndarray:
    """Inverse of `gamma_split`: gaps from classes and remainders."""
    return (np.int64(1) << classes.astype(np.int64)) + remainders.astype(np.int64) - 1


def pack_bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate the low `widths[i]` bits of every `values[i]`, most significant bit first.

    Returns the packed bytes as a uint8 array (the last byte zero-padded). Values must be
    non-negative and fit their width; widths may be 0 (the value then takes no space).
    """
    values = np.asarray(values, dtype=np.int64).ravel()
    widths = np.asarray(widths, dtype=np.int64).ravel()
    if values.shape != widths.shape:
        raise ValueError(f"values {values.shape} and widths {widths.shape} must have the same length")
    if widths.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if widths.min() < 0 or widths.max() > MAX_WIDTH:
        raise ValueError(f"bit widths must be in [0, {MAX_WIDTH}]")
    if values.min() < 0 or np.any(values >> widths):
        raise ValueError("every value must be non-negative and fit in its bit width")
    starts = np.cumsum(widths) - widths
    bits = np.zeros(int(widths.sum()), dtype=np.uint8)
    # One pass per bit position keeps memory at one byte per output bit.
    for bit in range(int(widths.max())):
        has_bit = widths > bit
        shift = widths[has_bit] - 1 - bit
        bits[starts[has_bit] + bit] = (values[has_bit] >> shift) & 1
    return np.packbits(bits)


def unpack_bits(packed: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of `pack_bits`: read one value of `widths[i]` bits each, in order (int64)."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    widths = np.asarray(widths, dtype=np.int64).ravel()
    if widths.size == 0:
        return np.zeros(0, dtype=np.int64)
    if widths.min() < 0 or widths.max() > MAX_WIDTH:
        raise ValueError(f"bit widths must be in [0, {MAX_WIDTH}]")
    total_bits = int(widths.sum())
    if total_bits > packed.size * 8:
        raise ValueError(f"packed buffer holds {packed.size * 8} bits but the widths need {total_bits}")
    starts = np.cumsum(widths) - widths
    first_byte = starts >> 3
    padded = np.concatenate([packed, np.zeros(8, dtype=np.uint8)])
    window = np.zeros(widths.shape, dtype=np.uint64)
    for offset in range(8):  # big-endian 64-bit window starting at each value's first byte
        window = (window << np.uint64(8)) | padded[first_byte + offset].astype(np.uint64)
    # width 0 would shift by 64 (undefined for uint64); its mask is 0, so any shift below 64 works
    shift = np.minimum(64 - (starts & 7) - widths, 63).astype(np.uint64)
    mask = (np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1)
    return ((window >> shift) & mask).astype(np.int64)

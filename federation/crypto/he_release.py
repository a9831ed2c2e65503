"""Decrypted CKKS values on their way out of a client: the rounding grid and the release.

CKKS is not IND-CPA-D secure (Li & Micciancio, EUROCRYPT 2021): the exact decryption of a ciphertext
the adversary holds reveals the noise, and a few such pairs give the secret key by linear algebra.
Every decrypted value that leaves a client passes `release`: rounded to decimals at least
2**margin_bits above the noise bound (Lattigo's mitigation; `release_decimals`,
`mean_release_decimals`), optionally after Gaussian flooding noise (OpenFHE's).
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from federation.crypto.he_params import RELEASE_MARGIN_BITS, CkksParameters


def release_decimals(error_bound: float, *, margin_bits: int = RELEASE_MARGIN_BITS) -> int:
    """Decimals for `release` that round at least 2**margin_bits above `error_bound` (for a
    mean: keyring.noise_bound(n_clients) / total_weight). A value then changes with the noise
    only when it lies within the noise of a rounding boundary, with probability ~2**-margin_bits
    for values spread over the grid."""
    if not (error_bound > 0 and math.isfinite(error_bound)):
        raise ValueError(f"error_bound must be a positive finite number, got {error_bound}")
    return math.floor(-math.log10(error_bound * 2.0**margin_bits))


def mean_release_decimals(
    parameters: CkksParameters,
    total_weight: float,
    *,
    max_decimals: int,
    margin_bits: int = RELEASE_MARGIN_BITS,
) -> int:
    """Decimals at which a decrypted mean of `total_weight` may leave a client: at most `max_decimals`,
    and a grid at least 2**margin_bits above the noise of the mean, bounded by the noise of an aggregate
    of `parameters.max_clients` fresh updates (the most an honest aggregate sums) over the weight."""
    if not (total_weight > 0 and math.isfinite(total_weight)):
        raise ValueError("total_weight must be a positive finite number")
    bound = parameters.noise_bound(parameters.max_clients) / total_weight
    return min(max_decimals, release_decimals(bound, margin_bits=margin_bits))


def release(values, *, decimals: int, noise_std: float = 0.0, seed: int | None = None) -> np.ndarray:
    """Prepare decrypted values to leave the clients (for the server, a report, a final model).

    CKKS decryptions carry the encryption noise, and an adversary holding a ciphertext and its
    exact decryption can recover the secret key (Li & Micciancio 2021). Rounding to `decimals`
    (see `release_decimals`) drops the noise bits, as Lattigo's DecodeAndRound does;
    `noise_std` > 0 first adds Gaussian flooding noise, OpenFHE's provable mitigation when
    its standard deviation is far above `Keyring.noise_bound` (the statistical distance it
    leaves shrinks with bound / noise_std). Use both when values are released repeatedly."""
    array = np.asarray(values, dtype=np.float64)
    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be a non-negative finite number, got {noise_std}")
    if noise_std > 0:
        # Flooding noise must be unpredictable to whoever sees the result: seed only for tests.
        rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
        array = array + rng.normal(0.0, noise_std, size=array.shape)
    return np.round(array, decimals)

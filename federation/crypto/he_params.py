"""CKKS parameters for add-only aggregation: ring, modulus, scale, and the error and range they give.

The server only adds ciphertexts, so no multiplication, rescaling or rotation ever happens and
the modulus chain needs no levels: one data prime plus SEAL's special prime (the last entry
of `coeff_mod_bit_sizes`, never part of a ciphertext; TenSEAL needs it because it builds
relinearization keys, and 20 bits suffice). A ciphertext holds N/2 values in two polynomials
of N coefficients modulo q, so it costs about log2(q)/2 bytes per value whatever N is.

Error model (measured within 10% on this machine, tests/federation/test_he.py checks the bound): a
decrypted sum of n fresh symmetric encryptions carries per value a Gaussian error of standard
deviation sqrt(n * N * (3.2**2 + 1/12) / 2) / scale: SEAL's fresh noise (sigma 3.2) plus
rounding at encoding, mapped through the canonical embedding (N coefficients, real part).
Range: each b-bit prime is >= 2**(b-1), so q >= 2**(bits - k) for k data primes, and SEAL
decodes values in (-q/2, q/2) / scale; beyond, the sum wraps around silently.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from federation.crypto.codec import max_ciphertext_bytes

# SEAL's 128-bit security limit on the total coefficient modulus bits (HE standard).
MAX_MODULUS_BITS = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
# SEAL samples fresh noise with standard deviation 3.2; encoding rounds to integers (variance 1/12).
_NOISE_VARIANCE = 3.2**2 + 1 / 12
_NOISE_SIGMAS = 7.0
SPECIAL_PRIME_BITS = 20


class CkksParameters(BaseModel):
    """CKKS ring and modulus; the last `coeff_mod_bit_sizes` entry is the special prime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    poly_modulus_degree: int = Field(8192, description="ring degree N; N/2 values per ciphertext")
    coeff_mod_bit_sizes: tuple[int, ...] = (60, SPECIAL_PRIME_BITS)
    global_scale: float = Field(2.0**35, gt=1.0, description="CKKS scale: precision vs range")
    max_clients: int = Field(64, ge=1, le=1_000_000, description="most updates one aggregate may sum")

    @model_validator(mode="after")
    def _check(self) -> CkksParameters:
        n = self.poly_modulus_degree
        if n not in MAX_MODULUS_BITS:
            raise ValueError(f"poly_modulus_degree={n}: use one of {sorted(MAX_MODULUS_BITS)}")
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError(
                "coeff_mod_bit_sizes needs at least two primes (data primes, then the special prime), "
                "e.g. (60, 20)"
            )
        if any(not 17 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise ValueError(
                f"coeff_mod_bit_sizes={self.coeff_mod_bit_sizes}: each prime must be 17..60 bits"
            )
        total = sum(self.coeff_mod_bit_sizes)
        if total > MAX_MODULUS_BITS[n]:
            raise ValueError(
                f"coeff_mod_bit_sizes sum to {total} bits; N={n} allows {MAX_MODULUS_BITS[n]} at 128-bit "
                "security: use fewer bits or a larger poly_modulus_degree"
            )
        if self.max_abs_update <= 0 or not math.isfinite(self.max_abs_update):
            raise ValueError("global_scale leaves no room for values: lower it or add data-prime bits")
        return self

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_prime_bits(self) -> tuple[int, ...]:
        return self.coeff_mod_bit_sizes[:-1]

    @property
    def max_abs_sum(self) -> float:
        """Largest |sum| that decrypts correctly: each b-bit prime is >= 2**(b-1), so the data
        modulus q >= 2**(bits - k), and SEAL decodes values in (-q/2, q/2) / scale."""
        bits = sum(self.data_prime_bits) - len(self.data_prime_bits) - 1
        return 2.0**bits / self.global_scale

    @property
    def max_abs_update(self) -> float:
        return self.max_abs_sum / self.max_clients

    def noise_bound(self, n_clients: int) -> float:
        """High-probability bound (7 sigma) on the absolute error of a decrypted sum of
        `n_clients` fresh encryptions, plus float64 rounding in SEAL's encoder at full range."""
        if n_clients < 1:
            raise ValueError(f"n_clients must be >= 1, got {n_clients}")
        sigma = math.sqrt(n_clients * self.poly_modulus_degree * _NOISE_VARIANCE / 2) / self.global_scale
        return _NOISE_SIGMAS * sigma + self.max_abs_sum * 2.0**-52 * math.log2(self.poly_modulus_degree)

    def max_ciphertext_bytes(self) -> int:
        return max_ciphertext_bytes(self.poly_modulus_degree, len(self.data_prime_bits))


def choose_parameters(
    n_values: int, *, max_abs_update: float, abs_error: float = 1e-6, max_clients: int = 64
) -> CkksParameters:
    """The cheapest add-only parameters for `n_values` values per update, each client's
    |weight * value| and weight at most `max_abs_update`, and a decrypted sum of up to
    `max_clients` updates within `abs_error` (with high probability)."""
    if n_values < 1:
        raise ValueError(f"n_values must be >= 1, got {n_values}")
    if not (max_abs_update > 0 and math.isfinite(max_abs_update)):
        raise ValueError(f"max_abs_update must be a positive finite number, got {max_abs_update}")
    if not (abs_error > 0 and math.isfinite(abs_error)):
        raise ValueError(f"abs_error must be a positive finite number, got {abs_error}")
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    max_abs_sum = max_abs_update * max_clients
    if max_abs_sum / abs_error > 2.0**45:
        raise ValueError(
            f"max_abs_update * max_clients / abs_error = {max_abs_sum / abs_error:.3g} exceeds 2**45, "
            "past what float64 encoding keeps: ask for a larger abs_error or a smaller range"
        )
    # Smallest ring holding the payload (and its weight slot) in one ciphertext; N=8192 beyond.
    preferred = next((n for n in (2048, 4096) if n // 2 >= n_values + 1), 8192)
    for degree in (d for d in (2048, 4096, 8192, 16384) if d >= preferred):
        sigma_scaled = math.sqrt(max_clients * degree * _NOISE_VARIANCE / 2)
        # Half the error budget for the noise, half for float64 rounding at full range.
        scale_bits = math.ceil(math.log2(2 * _NOISE_SIGMAS * sigma_scaled / abs_error))
        data_bits = max(24, scale_bits + math.ceil(math.log2(max_abs_sum)) + 2)
        if data_bits <= 60 and data_bits + SPECIAL_PRIME_BITS <= MAX_MODULUS_BITS[degree]:
            return CkksParameters(
                poly_modulus_degree=degree,
                coeff_mod_bit_sizes=(data_bits, SPECIAL_PRIME_BITS),
                global_scale=2.0**scale_bits,
                max_clients=max_clients,
            )
    raise ValueError(
        f"no single 60-bit data prime holds sums up to {max_abs_sum:.3g} at error {abs_error:.3g}: "
        "relax abs_error, lower max_abs_update, or build CkksParameters by hand"
    )


# Decrypted values leave a client rounded at least this far above the CKKS noise (see release_decimals).
RELEASE_MARGIN_BITS = 20


def release_abs_error(decimals: int, min_weight: float, margin_bits: int = RELEASE_MARGIN_BITS) -> float:
    """The largest error of a decrypted *sum* that still lets a mean of total weight >= `min_weight`
    be released at `decimals` decimals with `margin_bits` of margin: 10**-decimals * min_weight / 2**m."""
    if min_weight <= 0 or margin_bits < 0:
        raise ValueError(f"min_weight must be > 0 and margin_bits >= 0, got {min_weight}, {margin_bits}")
    return 10.0**-decimals * min_weight * 2.0**-margin_bits


def choose_release_parameters(
    n_values: int,
    *,
    max_abs_update: float,
    max_clients: int,
    decimals: int,
    min_weight: float,
    margin_bits: int = RELEASE_MARGIN_BITS,
    abs_error: float | None = None,
) -> CkksParameters:
    """`choose_parameters` for an error small enough that a mean of total weight >= `min_weight` can be
    released at `decimals` decimals `margin_bits` above the noise bound (and at most `abs_error`).

    When `max_abs_update` leaves no room for that (one 60-bit data prime and float64 encoding bound
    range / error), the finest parameters that exist are returned instead: the release then rounds to
    fewer decimals (`he.release_decimals` derives them from the real noise bound), never to a grid
    closer to the noise."""
    target = release_abs_error(decimals, min_weight, margin_bits)
    if abs_error is not None:
        target = min(target, abs_error)
    error = max(target, max_abs_update * max_clients * 2.0**-45 * (1 + 1e-12))
    for _ in range(200):  # relax by factors of 2 until one data prime holds it
        try:
            return choose_parameters(
                n_values, max_abs_update=max_abs_update, abs_error=error, max_clients=max_clients
            )
        except ValueError:
            error *= 2.0
    return choose_parameters(
        n_values, max_abs_update=max_abs_update, abs_error=error, max_clients=max_clients
    )

"""8-bit non-uniform quantizer for teacher log-probabilities (the only lossy step of the cache).

Why this shape. Perturbing the log-probability of entry i by a small e_i changes the
distribution by KL(p || p') ~ 1/2 * Var_p(e), i.e. each entry costs about p_i * e_i**2 / 2.
Spending the same KL on every entry therefore allows an error proportional to 1/sqrt(p_i):
a uniform step in sqrt(p) (the compander u = 2*sqrt(p)/c, log step ~ c/sqrt(p)), which is
also the optimal point density for this weighted error under entropy coding. Pure sqrt
companding would let the smallest probabilities collapse to 0, so below the knee
p* = (c/d)**2 the step is capped at d nats: every stored log-probability keeps a bounded
error, which matters to objectives that weight the teacher's log-probabilities by the
student's probabilities (reverse KL, JSD).

    u(l) = 2*exp(l/2)/c                   for l >= knee = 2*log(c/d)
    u(l) = 2/d + (l - knee)/d             for l <  knee

Codes are `round(u(l) - u(floor))` for l clamped to [floor, 0]; code 0 is the floor.
Reconstruction is the inverse compander at the code, clamped to <= 0.

Per-entry error bound (before the decoder's renormalization, see codec.py): |l' - l| is at
most d/2 below the knee and at most 2*|log(1 - c/(4*sqrt(p)))| above it (half a step in
sqrt(p) space), for l >= floor.
"""

from __future__ import annotations

import math

import numpy as np

MAX_LEVELS = 256


class LogProbQuantizer:
    """Quantize log-probabilities l <= 0 to uint8 codes and back.

    sqrt_step (c): step in 2*sqrt(p) units; sets the error of likely tokens.
    max_log_step (d): largest step in nats, used below the knee p* = (c/d)**2.
    log_floor: log-probabilities below it are stored as the floor (code 0).
    """

    def __init__(self, sqrt_step: float, max_log_step: float, log_floor: float) -> None:
        if not 0.0 < sqrt_step < max_log_step:
            raise ValueError(f"need 0 < sqrt_step ({sqrt_step}) < max_log_step ({max_log_step})")
        if not log_floor < 0.0:
            raise ValueError(f"log_floor must be negative, got {log_floor}")
        self.sqrt_step = sqrt_step
        self.max_log_step = max_log_step
        self.log_floor = log_floor
        self.knee = 2.0 * math.log(sqrt_step / max_log_step)
        self._u_floor = float(self._compand(np.array([log_floor]))[0])
        self.n_levels = int(math.floor(float(self._compand(np.array([0.0]))[0]) - self._u_floor + 0.5)) + 1
        if self.n_levels > MAX_LEVELS:
            raise ValueError(
                f"these quantizer settings need {self.n_levels} levels, more than {MAX_LEVELS} (8 bits): "
                "raise sqrt_step or max_log_step, or raise log_floor"
            )
        table = self._expand(np.arange(self.n_levels, dtype=np.float64) + self._u_floor)
        table[0] = log_floor
        self.table = np.minimum(table, 0.0)  # log-probability of each code

    def _compand(self, logprobs: np.ndarray) -> np.ndarray:
        c, d = self.sqrt_step, self.max_log_step
        above = 2.0 * np.exp(np.maximum(logprobs, self.knee) / 2.0) / c
        below = 2.0 / d + (logprobs - self.knee) / d
        return np.where(logprobs >= self.knee, above, below)

    def _expand(self, u: np.ndarray) -> np.ndarray:
        c, d = self.sqrt_step, self.max_log_step
        u_knee = 2.0 / d
        above = 2.0 * np.log(np.maximum(u, u_knee) * c / 2.0)
        below = self.knee + (u - u_knee) * d
        return np.where(u >= u_knee, above, below)

    def encode(self, logprobs: np.ndarray) -> np.ndarray:
        """uint8 codes of log-probabilities (clamped to [log_floor, 0]; -inf maps to the floor)."""
        logprobs = np.asarray(logprobs, dtype=np.float64)
        if np.isnan(logprobs).any():
            raise ValueError("log-probabilities contain NaN; check the teacher's logits")
        clamped = np.clip(logprobs, self.log_floor, 0.0)
        codes = np.rint(self._compand(clamped) - self._u_floor)
        return np.clip(codes, 0, self.n_levels - 1).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Log-probabilities (float64) of codes; codes must be < n_levels."""
        codes = np.asarray(codes)
        if codes.size and int(codes.max()) >= self.n_levels:
            raise ValueError(f"quantizer code {int(codes.max())} out of range (n_levels={self.n_levels})")
        return self.table[codes]

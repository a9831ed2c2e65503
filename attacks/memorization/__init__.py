"""Memorization audits: canary exposure (`apparatus.canaries`, shared with the defenses), training-data
extraction (`extraction`) and the `memorization` plugin (`audit`, registered by `plugin`)."""

import attacks.memorization.plugin  # noqa: F401  (registers the plugin)
from apparatus.canaries import CanaryExposure, mean_exposure_by_repeats, measure_canary
from attacks.memorization.audit import MemorizationConfig, MemorizationResult, run
from attacks.memorization.extraction import (
    TrainingDataIndex,
    precision_at,
    sample_generations,
    targeted_canary_extraction,
    zlib_entropy_bits,
    zlib_ratio,
)

__all__ = [
    "CanaryExposure",
    "MemorizationConfig",
    "MemorizationResult",
    "TrainingDataIndex",
    "mean_exposure_by_repeats",
    "measure_canary",
    "precision_at",
    "run",
    "sample_generations",
    "targeted_canary_extraction",
    "zlib_entropy_bits",
    "zlib_ratio",
]

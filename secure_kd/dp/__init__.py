"""Differentially private students: DP-SGD distillation with Opacus and a privacy ledger per dataset.

- `PrivacyConfig` (`train.privacy` in a job config).
- `Ledger`: what a private dataset has spent, on disk, across runs and federated rounds.
- `accounting`: epsilon from Opacus' RDP or PRV accountant, delta defaults, noise calibration.
- `engine`: the Opacus wiring of a student (per-sample gradients, DP optimizer).
- `DPDistiller`: the `Distiller` with Poisson sampling, clipping, noise, budget stop and ledger.

Only the configuration is imported eagerly (secure_kd.config imports it); the rest loads on first
use so that reading a config does not import torch or Opacus.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from secure_kd.dp.config import PrivacyConfig

_LAZY = {
    "Ledger": "secure_kd.dp.ledger",
    "LedgerEntry": "secure_kd.dp.ledger",
    "LedgerError": "secure_kd.dp.ledger",
    "dataset_key": "secure_kd.dp.ledger",
    "default_delta": "secure_kd.dp.accounting",
    "resolve_delta": "secure_kd.dp.accounting",
    "epsilon": "secure_kd.dp.accounting",
    "epsilons": "secure_kd.dp.accounting",
    "noise_multiplier_for_budget": "secure_kd.dp.accounting",
    "steps_within_budget": "secure_kd.dp.accounting",
    "PrivacyBudgetExhausted": "secure_kd.dp.accounting",
    "make_private": "secure_kd.dp.engine",
    "PrivateStudent": "secure_kd.dp.engine",
    "DPDistiller": "secure_kd.dp.trainer",
    "PrivacyReport": "secure_kd.dp.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'secure_kd.dp' has no attribute {name!r}")


__all__ = ["PrivacyConfig", *_LAZY]

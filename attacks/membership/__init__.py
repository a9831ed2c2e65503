"""Membership inference: loss attack, RMIA and LiRA scores (`scores`) and the `membership` audit plugin
(`audit`, registered by `plugin`)."""

import attacks.membership.plugin  # noqa: F401  (registers the plugin)
from attacks.membership.audit import balanced_membership, run, train_shadows
from attacks.membership.config import AttackROC, MembershipConfig, MembershipResult
from attacks.membership.scores import (
    lira_scores,
    logit_confidence,
    loss_attack_scores,
    rmia_scores,
    tune_offline_a,
)

__all__ = [
    "AttackROC",
    "MembershipConfig",
    "MembershipResult",
    "balanced_membership",
    "lira_scores",
    "logit_confidence",
    "loss_attack_scores",
    "rmia_scores",
    "run",
    "train_shadows",
    "tune_offline_a",
]

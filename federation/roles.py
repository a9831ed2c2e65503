"""The test roles a job may give an organization besides being honest, as the job's schema: `adversaries`
(`AdversaryConfig`) and `simulate_faults` (`FaultKind`).

What the roles do is in `federation.simulation` (`adversary.py`, `faults.py`), as Flower mods that only the
simulation's ClientApp installs (`federation.simulation.mods`). The ClientApp that `flwr run` and deployed
SuperNodes load installs none and refuses a job that gives one of its organizations a role
(`federation.client.guard`). A role that attacks the other mode's payloads is a validation error
(`federation.config`). Kinds:

- `scale` / `sign_flip` / `backdoor` (fedavg): a boosted, reversed, or backdoored and boosted update;
- `poison_soft_labels` (fed_distill): soft labels pushed toward one column of the public index set;
- faults: `crash`, `crash_final`, `slow`, `nan`, `oversized`, `wrong_shape` (federation.simulation.faults).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from secure_kd.config import Strict
from secure_kd.triggers import TextTrigger

TEST_ROLE_FIELDS = ("adversaries", "simulate_faults")
FaultKind = Literal["crash", "crash_final", "slow", "nan", "oversized", "wrong_shape"]

AdversaryKind = Literal["scale", "sign_flip", "backdoor", "poison_soft_labels"]


FEDAVG_KINDS = frozenset({"scale", "sign_flip", "backdoor"})


class AdversaryConfig(Strict):
    kind: AdversaryKind
    boost: float = Field(10.0, gt=0, description="scale / sign_flip / backdoor: factor on the update")
    trigger: TextTrigger = TextTrigger(phrase="cf", target_text="zz")
    poison_fraction: float = Field(0.5, gt=0, le=1, description="backdoor: share of records poisoned")
    local_steps: int | None = Field(
        None, ge=1, description="backdoor: local training steps of the attacker (default: train.max_steps)"
    )
    target_column: int = Field(0, ge=0, description="poison_soft_labels: column of the public index set")
    strength: float = Field(1.0, gt=0, le=1, description="poison_soft_labels: mix toward the one-hot")

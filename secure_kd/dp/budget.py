"""The privacy budget of a `DPDistiller` run: calibration, the plan, and each step's reservation.

`BudgetMixin` holds the budget half of `secure_kd.dp.trainer.DPDistiller` (which mixes it in and
provides the attributes it reads: `privacy`, `ledger`, `entry_id`, `noise_multiplier`,
`sample_rate`, `delta`, `planned_steps`, `total_steps`, `expected_batch_size`, `dist`, `log`,
`_on_main`):
- the noise multiplier calibrated to `target_epsilon` over the planned steps, counting what the
  dataset's ledger already spent, refused above `max_noise_multiplier`;
- the plan: how many steps fit the budget (training stops, saves and says so before a step that
  would exceed it);
- each step reserved in the ledger before it is computed, the budget check and the write under the
  ledger's lock; a run that spent budget meanwhile on the same dataset is seen there.
Under data parallelism rank 0 alone reads and writes the ledger and decides; the others receive its
decisions (one reservation per step, not per rank).
"""

from __future__ import annotations

from secure_kd.dp.accounting import (
    PrivacyBudgetExhausted,
    epsilon,
    noise_multiplier_for_budget,
    steps_within_budget,
)


class BudgetTakenConcurrently(Exception):
    """Another run took the budget of this dataset meanwhile: the run stops before step `step`."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason


class BudgetMixin:
    """Budget planning and per-step reservation of a DP run (see the module docstring)."""

    def _eps_after(self, steps: int, others: list | None = None) -> float:
        return epsilon(
            [*(self._others if others is None else others), (self.noise_multiplier, self.sample_rate, steps)],
            self.delta,
            self.privacy.accountant,
        )

    def _allowed_steps(self) -> int:
        return steps_within_budget(
            target_epsilon=self.privacy.target_epsilon,
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            upper=self.planned_steps,
            accountant=self.privacy.accountant,
            prior=self._others,
        )

    def _stop_message(self, allowed: int) -> str:
        return (
            f"privacy budget: training stops after step {allowed} of {self.planned_steps}: one more step "
            f"would take epsilon ({self.privacy.accountant}, delta={self.delta:g}) from "
            f"{self._eps_after(allowed):.4f} to {self._eps_after(allowed + 1):.4f}, above "
            f"target_epsilon={self.privacy.target_epsilon}"
        )

    def _plan_budget(self, start: int) -> None:
        self._on_main(lambda: self._plan_budget_on_main(start))
        if self.dist.enabled:
            self.total_steps = self.dist.broadcast_int(self.total_steps)
            self._allowed = self.dist.broadcast_int(self._allowed)
            self.stop_reason = self.dist.broadcast_str(self.stop_reason)

    def _plan_budget_on_main(self, start: int) -> None:
        self.total_steps = self.planned_steps
        self._others = self.ledger.history(exclude=self.entry_id)
        if self.privacy.target_epsilon is None:
            return
        allowed = self._allowed = self._allowed_steps()
        if allowed == 0 and start == 0:
            spent = epsilon(self._others, self.delta, self.privacy.accountant)
            raise PrivacyBudgetExhausted(
                f"no DP step fits in target_epsilon={self.privacy.target_epsilon}: the ledger "
                f"{self.ledger.path} has spent epsilon={spent:.4f} ({self.privacy.accountant}, "
                f"delta={self.delta:g}) and one step at noise_multiplier={self.noise_multiplier:.4g} would "
                f"take it to {self._eps_after(1):.4f}"
            )
        if allowed < self.planned_steps:
            self.total_steps = max(allowed, start)
            self.stop_reason = self._stop_message(allowed)
            self.log(self.stop_reason)

    def _fits(self, others: list, steps: int) -> bool:
        """Under the ledger's lock: do `steps` of this run fit the budget next to the `others` entries?"""
        if self.privacy.target_epsilon is None:
            return True
        self._seen_others = others
        if others == self._others:
            return steps <= self._allowed
        # another run spent budget on this dataset meanwhile: one evaluation, not a new plan
        return self._eps_after(steps, others) <= self.privacy.target_epsilon

    def _reserve(self, step: int) -> None:
        """Count step `step` (0-based) in the ledger before any of it is computed, or stop the run.

        Under data parallelism rank 0 reserves, once for the global batch, and tells the others."""
        reserved = self.ledger.reserve(self.entry_id, step + 1, self._fits) if self.dist.is_main else True
        if self.dist.enabled:
            reserved = bool(self.dist.broadcast_int(int(reserved)))
        if reserved:
            return
        reason = None
        if self.dist.is_main:
            self._others = self._seen_others
            meanwhile = " (another run spent budget on this dataset meanwhile)"
            reason = self._stop_message(step) + meanwhile
        raise BudgetTakenConcurrently(step, self.dist.broadcast_str(reason))

    def _calibrated_noise(self) -> float:
        cfg, prior = self.privacy, self.ledger.history()
        sigma = noise_multiplier_for_budget(
            target_epsilon=cfg.target_epsilon,
            delta=self.delta,
            sample_rate=self.sample_rate,
            steps=self.planned_steps,
            accountant=cfg.accountant,
            prior=prior,
        )
        if sigma <= cfg.max_noise_multiplier:
            return sigma
        spent = epsilon(prior, self.delta, cfg.accountant)
        noise_std = sigma * cfg.max_grad_norm / self.expected_batch_size
        raise ValueError(
            f"target_epsilon={cfg.target_epsilon} over {self.planned_steps} steps at sample rate "
            f"{self.sample_rate:.4g} needs noise_multiplier={sigma:.3f}"
            + (f" (the dataset's ledger has already spent epsilon={spent:.4f} of it)" if prior else "")
            + f", above max_noise_multiplier={cfg.max_noise_multiplier}: the noise would swamp the gradient "
            f"(noise std on the averaged gradient: {noise_std:.3g}). Raise target_epsilon, train fewer "
            "steps, use larger batches, or raise max_noise_multiplier to accept the utility loss"
        )

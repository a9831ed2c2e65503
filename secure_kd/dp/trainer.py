"""DPDistiller: the Distiller trained with DP-SGD (Opacus), with a ledger and a budget stop.

What changes from `Distiller`:
- each optimizer step trains on a Poisson sample of the records (secret randomness, see
  `sampling.py`), split into physical batches by Opacus' `BatchMemoryManager`;
- losses are per example (`reduction="none"`), each example's gradient is clipped, Gaussian noise
  is added once per step (`engine.py`); an empty sample still takes a noise-only step;
- every step is reserved in the dataset's ledger before it starts (the budget check and the write
  under the ledger's lock, so concurrent runs on the dataset never exceed its budget together), so
  the ledger never counts less than what was released; a resumed run continues its own entry;
- with `target_epsilon`, the noise is calibrated to the budget left in the ledger and training
  stops, saves and says so before a step that would exceed it; `<out>/privacy.json` is written.

Data-parallel (torchrun / accelerate launch, `secure_kd.distributed`): every rank draws the same
Poisson sample of the whole dataset (the run's secret is rank 0's, broadcast once) and trains on its
contiguous slice of it; each rank clips its own examples, rank 0 alone adds the noise, once per step
(`engine.py`), and the ranks' gradients are averaged: the update, and so epsilon, are those of the
one-process run. Rank 0 alone reads and writes the ledger (one reservation per step, not per rank),
calibrates the noise, plans the budget and writes privacy.json; the others receive its decisions.

Off-policy KD (live teacher or cache), on-policy KD (DP-OPD: the student samples continuations of
private prompts, the teacher scores them), sequence-level KD and DP-SFT (ce only) all go through
the same per-example loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import Tensor
from torch.utils.data import DataLoader

from secure_kd.checkpoint import ResumeError, latest_checkpoint, save_checkpoint
from secure_kd.config import KDConfig
from secure_kd.data import assert_one_record_per_sequence, collate
from secure_kd.distributed import to_device
from secure_kd.dp.accounting import resolve_delta
from secure_kd.dp.budget import BudgetMixin, BudgetTakenConcurrently
from secure_kd.dp.engine import PrivateStudent, check_supported, register_samplers, untie_embeddings
from secure_kd.dp.ledger import Ledger
from secure_kd.dp.report import PrivacyReport, run_report
from secure_kd.dp.sampling import SecretRandomness, step_loader
from secure_kd.dp.user_level import UserLevelMixin, check_ledger_units
from secure_kd.losses import loss_info
from secure_kd.paths import atomic_write_json
from secure_kd.teacher_targets import shift_labels
from secure_kd.trainer import Distiller, FitResult


def check_private_objective(kd: KDConfig) -> None:
    """Objectives whose per-example loss depends on other examples, or on hidden state, are refused."""
    if kd.fused:
        raise ValueError(
            "kd.fused is not available under DP: the fused loss multiplies by the output layer's weight "
            "directly, so Opacus never sees that layer's per-example gradients. Set kd.fused: false"
        )
    if loss_info(kd.loss).stateful:
        raise ValueError(
            f"kd.loss {kd.loss!r} keeps state updated from whole batches (not privatized), which DP-SGD "
            "does not cover; choose a stateless objective (forward_kl, reverse_kl, jsd, tvd, skew_*, ce, ...)"
        )


def _silent(message: str) -> None:
    pass


class DPDistiller(UserLevelMixin, BudgetMixin, Distiller):
    """`Distiller` with DP-SGD. Takes Distiller's arguments, `train.privacy` set, plus `dataset_key`
    (`secure_kd.dp.ledger.dataset_key` of the private dataset's records before any split: the
    ledger's default key, and what a user-supplied `ledger_key` must name) and `caveats` the caller
    knows of (e.g. a tokenizer trained on the private text), added to privacy.json.

    With `privacy.unit: user` (`secure_kd.dp.user_level`) also `user_of_example` (one user key per
    example), `user_field` (its name, for privacy.json) and `user_grouping` (a fingerprint of the
    grouping of the dataset's records into users, recorded in the ledger)."""

    def __init__(
        self,
        *,
        dataset_key: str,
        log: Callable[[str], None] = print,
        caveats: Sequence[str] = (),
        user_of_example: Sequence[Hashable] | None = None,
        user_field: str | None = None,
        user_grouping: str | None = None,
        **kwargs: Any,
    ) -> None:
        train, kd, student = kwargs["train"], kwargs["kd"], kwargs["student"]
        privacy = train.privacy
        if privacy is None:
            raise ValueError("DPDistiller needs train.privacy; without it use Distiller")
        assert_one_record_per_sequence(kwargs["examples"])
        self.users = self._user_groups(privacy, kwargs["examples"], user_of_example, train)
        self.user_field, self.user_grouping = user_field, user_grouping
        check_private_objective(kd)
        if privacy.untie_embeddings:
            untie_embeddings(student)  # before the optimizer exists, so it trains the new output layer
        register_samplers()
        check_supported(student, privacy.grad_sample_mode)
        super().__init__(**kwargs)
        if not self.dist.is_main:
            log = _silent  # one process speaks for the run
        self.privacy, self.log, self.extra_caveats = privacy, log, list(caveats)
        self.n_records = len(self.examples)
        if self.users is not None and self.dist.enabled:
            raise ValueError(
                "train.privacy.unit: user is not implemented under data parallelism (torchrun / accelerate "
                "launch); run it in one process"
            )
        n_units = self.n_records if self.users is None else self.users.n_users
        self.expected_batch_size = train.batch_size * train.grad_accum  # records, or users (unit: user)
        self.sample_rate = min(1.0, self.expected_batch_size / n_units)
        self.physical_batch_size = privacy.max_physical_batch_size or train.batch_size
        if self.users is not None and privacy.max_physical_batch_size is None:
            self.physical_batch_size = max(train.batch_size, privacy.max_records_per_user)
        self.delta = resolve_delta(privacy.delta, n_units)
        self.ledger = Ledger.open(  # only rank 0 reads or writes it
            privacy.ledger_key or dataset_key,
            privacy.ledger_dir,
            data_fingerprint=dataset_key if self.dist.is_main else None,
        )
        self.planned_steps = self.total_steps
        self.noise_multiplier: float | None = None
        self.entry_id: str | None = None
        self.randomness: SecretRandomness | None = None
        self.stop_reason: str | None = None
        self.report: PrivacyReport | None = None
        self._private: PrivateStudent | None = None
        self._others: list = []
        self._seen_others: list = []
        self._allowed = self.planned_steps
        self._losses, self._tokens = [], 0

    def _data_parallel_module(self) -> None:
        """No DDP: Opacus' distributed optimizer reduces the clipped, noised gradients; same start weights."""
        self.dist.broadcast_parameters(self.student)
        return None

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on rank 0 only (None elsewhere); a user error there stops every rank with its message."""
        if not self.dist.enabled:
            return fn()
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except ValueError as exc:
                error = exc
        message = self.dist.broadcast_str(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(message)
        return result

    # -- per-example loss --------------------------------------------------------------------------------
    def per_example_objective(self, batch: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
        """logits -> loss of each example, shape [batch]: the mean over its own trained tokens."""
        kd = self.kd
        labels = shift_labels(batch["labels"])
        teacher = self.targets(batch) if kd.kd_weight > 0 else None

        def losses_of(logits: Tensor) -> Tensor:
            losses = logits.new_zeros(logits.shape[0], dtype=torch.float32)
            if kd.kd_weight > 0:
                kd_losses = self.objective(
                    logits,
                    teacher,
                    labels,
                    temperature=kd.temperature,
                    tail=kd.tail,
                    chunk_size=kd.chunk_size,
                    reduction="none",
                    **self._call_params(),
                )
                losses = losses + kd.kd_weight * self._t2() * kd_losses
            if kd.ce_weight > 0:
                losses = losses + kd.ce_weight * self.ce(logits, None, labels, reduction="none")
            return losses

        return losses_of

    def _forward_backward(self, private: PrivateStudent, batch: dict[str, Tensor]) -> Tensor:
        objective = self.per_example_objective(batch)
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return private.backward(logits, objective)

    def _collate(self, indices: list[int]) -> dict[str, Tensor]:
        batch = collate([self.examples[i] for i in indices], pad_id=self.pad_id)
        batch["example_index"] = torch.tensor(indices, dtype=torch.long)
        return to_device(batch, self.device)

    def _rank_loader(self, loader: DataLoader) -> DataLoader:
        """This rank's contiguous slice of the step's logical batch (the same sample on every rank)."""
        if not self.dist.enabled:
            return loader
        (logical,) = list(loader)
        return DataLoader(range(self.n_records), batch_sampler=[self.dist.shard(logical)], collate_fn=list)

    # -- one DP step ---------------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, int]:
        self._reserve(step)
        private = self._private
        assert private is not None and self.randomness is not None, "train_step runs inside fit()"
        private.optimizer.zero_grad(set_to_none=True)
        private.optimizer.generator = self.randomness.generator("noise", step, self.device)
        if self.users is not None:
            return self._record(*self._user_step(private, step))
        loader = step_loader(
            n_records=self.n_records,
            sample_rate=self.sample_rate,
            step=step,
            randomness=self.randomness,
            poisson=self.privacy.poisson_sampling,
        )
        loader = self._rank_loader(loader)
        loss_sum, n_examples, tokens = 0.0, 0, 0
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=self.physical_batch_size, optimizer=private.optimizer
        ) as physical_batches:
            for indices in physical_batches:
                if indices:
                    batch = self._policy_batch(self._collate(indices), step)
                    losses = self._forward_backward(private, batch)
                    loss_sum += float(losses.sum())
                    n_examples += len(indices)
                    tokens += int((shift_labels(batch["labels"]) != -100).sum())
                else:
                    private.prepare_empty_batch()
                private.optimizer.step()  # clips and accumulates; noise and update at the logical batch's end
                private.optimizer.zero_grad(set_to_none=True)
        if self.dist.enabled:
            loss_sum, n_examples, tokens = self.dist.sum([loss_sum, n_examples, tokens])
            n_examples, tokens = int(n_examples), int(tokens)
        return self._record(loss_sum, n_examples, tokens)

    def _record(self, loss_sum: float, n_examples: int, tokens: int) -> tuple[float, int]:
        self.scheduler.step()
        loss = loss_sum / n_examples if n_examples else 0.0
        self._losses.append(loss)
        self._tokens += tokens
        return loss, tokens

    # -- fresh start or resume ----------------------------------------------------------------------------
    def _resume_record(self) -> dict:
        return {
            "config": self.privacy.resume_relevant(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "n_records": self.n_records,
            **self._user_resume_fields(),
            "entry_id": self.entry_id,
            "ledger": str(self.ledger.path),
        }

    def _start_fresh(self) -> int:
        self.randomness = SecretRandomness()
        if self.dist.enabled:  # one sample and one noise for the global batch: rank 0's secret
            self.randomness = SecretRandomness(self.dist.broadcast_int(self.randomness.secret))
        self.noise_multiplier = self.privacy.noise_multiplier
        if self.noise_multiplier is None:
            self.noise_multiplier = self._on_main(self._calibrated_noise)
            if self.dist.enabled:
                self.noise_multiplier = self.dist.broadcast_float(self.noise_multiplier)
        self._losses, self._tokens = [], 0
        return 0

    def _restore(self, checkpoint: Path) -> int:
        meta = json.loads((checkpoint / "trainer.json").read_text())
        saved = meta.get("privacy")
        if saved is None:
            raise ResumeError(
                f"checkpoint {checkpoint} was written without DP; resume it without train.privacy, or start "
                "the DP run in a new --out directory"
            )
        current = {
            "config": self.privacy.resume_relevant(),
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "n_records": self.n_records,
            **self._user_resume_fields(),
            "ledger": str(self.ledger.path),
        }
        changes = [
            f"{k}: {saved[k]!r} -> {v!r}" for k, v in current.items() if k != "config" and saved[k] != v
        ]
        changes += [
            f"privacy.{k}: {saved['config'].get(k)!r} -> {v!r}"
            for k, v in current["config"].items()
            if saved["config"].get(k) != v
        ]
        if changes:
            raise ResumeError(
                f"refusing to resume {checkpoint}: the privacy configuration changed ({'; '.join(changes)}). "
                "A run's accounting cannot change midway; restore the original settings to resume, or start "
                "a new run in a new --out directory (the dataset's ledger keeps counting either way)"
            )
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        self.randomness = SecretRandomness(int(state["extra"]["privacy_secret"]))
        self.noise_multiplier, self.entry_id = float(saved["noise_multiplier"]), saved["entry_id"]
        self._losses, self._tokens = list(meta.get("losses", [])), 0
        return int(meta["step"])

    def _save(self, step: int, losses: list[float]) -> Path:
        assert self.randomness is not None
        return save_checkpoint(
            self.out,
            step=step,
            model=self.student,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            config_hash=self.run_hash,
            extra={"losses": losses, "privacy": self._resume_record()},
            extra_state={"privacy_secret": self.randomness.secret},
        )

    # -- the run -------------------------------------------------------------------------------------------
    def fit(self, *, resume: bool = False) -> FitResult:
        checkpoint = latest_checkpoint(self.out, distributed=self.dist) if resume else None
        start = self._restore(checkpoint) if checkpoint is not None else self._start_fresh()
        unit = self.privacy.unit
        self._on_main(
            lambda: check_ledger_units(
                self.ledger.entries(), self.entry_id, unit, self.user_grouping, self.ledger.path
            )
        )
        self._plan_budget(start)
        if self.entry_id is None:
            self.entry_id = self._on_main(
                lambda: self.ledger.record(
                    kind="run",
                    label=str(self.out.resolve()),
                    noise_multiplier=self.noise_multiplier,
                    sample_rate=self.sample_rate,
                    steps=0,
                    max_grad_norm=self.privacy.max_grad_norm,
                    n_records=self.n_records,
                    sampling="poisson" if self.privacy.poisson_sampling else "shuffle",
                    **self._user_entry_fields(),
                )
            )
            if self.dist.enabled:
                self.entry_id = self.dist.broadcast_str(self.entry_id)
        if self.dist.is_main:
            self._log_plan()
        self._private = PrivateStudent(
            self.student,
            self.optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.privacy.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            mode=self.privacy.grad_sample_mode,
            secure_mode=self.privacy.secure_mode,
            distributed=self.dist,
        )
        return self._fit_private(resume, start)

    def _log_plan(self) -> None:
        population = f"{self.n_records} records"
        if self.users is not None:
            population = (
                f"{self.users.n_users} users, at most {self.privacy.max_records_per_user} records each per "
                f"step; user-level"
            )
        self.log(
            f"DP-SGD: noise_multiplier={self.noise_multiplier:.4g}, sample_rate={self.sample_rate:.4g} "
            f"(expected batch {self.expected_batch_size} of {population}), clip "
            f"{self.privacy.max_grad_norm:g}, delta={self.delta:g}; epsilon after {self.total_steps} steps: "
            f"{self._eps_after(self.total_steps):.4f} ({self.privacy.accountant}, ledger {self.ledger.path})"
        )

    def _fit_private(self, resume: bool, start: int) -> FitResult:
        plain_optimizer, self.optimizer = self.optimizer, self._private.optimizer
        started = time.perf_counter()
        try:
            result = super().fit(resume=resume)
        except BudgetTakenConcurrently as stop:
            self.stop_reason = stop.reason
            self._save(stop.step, self._losses)
            result = FitResult(
                steps=stop.step,
                losses=list(self._losses),
                tokens=self._tokens,
                seconds=time.perf_counter() - started,
                resumed_from=start or None,
            )
        finally:
            self._private.close()
            self.optimizer, self._private = plain_optimizer, None
        self.report = self._write_report() if self.dist.is_main else None  # rank 0's privacy.json
        if self.stop_reason:
            self.log(self.stop_reason)
        return result

    def _write_report(self) -> PrivacyReport:
        report = run_report(self)
        atomic_write_json(self.out / "privacy.json", report.model_dump(mode="json"), mode=0o600)
        return report

"""User-level DP-SGD (`train.privacy.unit: user`): the unit is every record of one user.

Neighbouring datasets differ by all the records of one user (`data.user_field`). Per step:

1. **Poisson sampling of users.** Each user joins the step independently with probability
   `q = expected users per step / number of users` (`train.batch_size * train.grad_accum` users
   expected; Opacus' `UniformWithReplacementSampler` over the users, secret randomness).
2. **At most `max_records_per_user` records per sampled user**, drawn uniformly at random without
   replacement, afresh at every step (secret randomness; a user with fewer records gives them all).
   Random rather than fixed so that over the run every record of a large user is trained on; the
   choice is made from the user's own records only, so it is part of that user's contribution.
3. **Per-user gradient = the SUM of that user's per-record gradients** (each record's gradient is that
   of its per-token mean loss, Opacus' per-sample gradients), clipped to norm `max_grad_norm` (C) as a
   whole by Opacus' DP optimizer: the sum, not the mean, because a user's gradient should weigh what
   the user's data says (like one record of the concatenated text) and clipping bounds it at C either
   way; a mean would shrink a many-record user's signal only until the clip, and the guarantee is the
   same.
4. **Gaussian noise once per step**, std `noise_multiplier * C`, and division by the expected number
   of users, as for records.

Adding or removing one user changes the sum of the clipped per-user gradients by a vector of norm at
most C, and that user is in a step with probability q independently of everyone else: this is exactly
the Poisson-subsampled Gaussian mechanism that Opacus' accountants analyse, with the user as the unit.
The ledger entry records the unit, the user rate q and the steps; epsilon comes from Opacus'
accountant over the ledger's entries, as for records.

Physical batches hold whole users (a user is never split across two, since clipping needs the
user's whole sum): greedy packing up to `max_physical_batch_size` records, which must be at least
`max_records_per_user`. Opacus' per-sample gradients of a physical batch are added up per user
(`per_user_grad_samples`) before the DP optimizer clips them. Ghost clipping (norms only) cannot be
summed per user and is refused; so is data parallelism (not implemented for users).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from secure_kd.dp.sampling import SecretRandomness
from secure_kd.teacher_targets import shift_labels

if TYPE_CHECKING:
    from secure_kd.dp.engine import PrivateStudent


class UserGroups:
    """The training examples of each user, users in order of first appearance."""

    def __init__(self, user_of_example: Sequence[Hashable]) -> None:
        slot: dict[Hashable, int] = {}
        self.members: list[list[int]] = []
        for index, user in enumerate(user_of_example):
            if user not in slot:
                slot[user] = len(self.members)
                self.members.append([])
            self.members[slot[user]].append(index)

    @property
    def n_users(self) -> int:
        return len(self.members)

    @property
    def largest(self) -> int:
        """The most examples any one user has."""
        return max((len(m) for m in self.members), default=0)


def sample_users(n_users: int, sample_rate: float, step: int, randomness: SecretRandomness) -> list[int]:
    """The users of step `step`: each independently with probability `sample_rate` (secret randomness)."""
    sampler = UniformWithReplacementSampler(
        num_samples=n_users,
        sample_rate=sample_rate,
        generator=randomness.generator("poisson-users", step),
        steps=1,
    )
    return [int(u) for u in next(iter(sampler))]


def choose_records(
    groups: UserGroups, users: Sequence[int], max_records: int, step: int, randomness: SecretRandomness
) -> list[list[int]]:
    """For each sampled user, at most `max_records` of its examples, uniformly at random (sorted)."""
    generator = randomness.generator("user-records", step)
    chosen = []
    for user in users:
        members = groups.members[user]
        if len(members) > max_records:
            picks = torch.randperm(len(members), generator=generator)[:max_records].tolist()
            members = [members[i] for i in sorted(picks)]
        chosen.append(list(members))
    return chosen


def physical_user_batches(selection: Sequence[Sequence[int]], max_records: int) -> list[list[list[int]]]:
    """Whole users packed greedily into batches of at most `max_records` examples (in sampling order)."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    size = 0
    for records in selection:
        if len(records) > max_records:
            raise ValueError(
                f"a user's {len(records)} records do not fit in a physical batch of {max_records}: raise "
                "train.privacy.max_physical_batch_size to at least max_records_per_user"
            )
        if current and size + len(records) > max_records:
            batches.append(current)
            current, size = [], 0
        current.append(list(records))
        size += len(records)
    if current:
        batches.append(current)
    return batches


def per_user_grad_samples(optimizer: DPOptimizer, slots: torch.Tensor, n_users: int) -> None:
    """Replace each parameter's per-record `grad_sample` [records, ...] by per-user sums [users, ...].

    `slots[i]` is the user (0..n_users-1 within this physical batch) of row i. Opacus' optimizer then
    clips each user's summed gradient to `max_grad_norm` as one sample."""
    for p in optimizer.params:
        per_record = optimizer._get_flat_grad_sample(p)
        if per_record.shape[0] != slots.shape[0]:
            raise RuntimeError(
                f"per-sample gradients hold {per_record.shape[0]} rows for {slots.shape[0]} records; "
                "per-user aggregation needs one forward/backward per physical batch"
            )
        summed = per_record.new_zeros((n_users, *per_record.shape[1:]))
        summed.index_add_(0, slots.to(per_record.device), per_record)
        p.grad_sample = summed


def unit_of(entry) -> str:
    """The unit of a ledger entry (entries written before units existed are record-level)."""
    return getattr(entry, "unit", None) or "record"


def check_ledger_units(entries, own_entry: str | None, unit: str, user_grouping: str | None, path) -> None:
    """Refuse to compose entries of another unit (or, for users, another grouping) with this run's.

    Opacus' accountant composes stretches of one mechanism on one unit. A record-level stretch protects
    a user with k records only at about k*epsilon (group privacy), which the accountant does not
    compute; a user-level stretch bounds a record's influence by a replace-one-user step, not by the
    add/remove-one-record step the record-level accountant assumes. So one dataset's ledger keeps one
    unit, and user-level stretches one grouping of records into users."""
    spent = [e for e in entries if e.steps > 0 and e.entry_id != own_entry]
    other = [e for e in spent if unit_of(e) != unit]
    if other:
        units = sorted({unit_of(e) for e in other})
        raise ValueError(
            f"the privacy ledger {path} of these records holds {len(other)} DP stretch(es) at unit "
            f"{', '.join(units)}, and this run's train.privacy.unit is {unit}: Opacus' accountant cannot "
            "compose the two units (a record-level run protects a user with k records only at about "
            "k*epsilon). Keep the unit this dataset's ledger was started with, or, only if you account "
            "for the earlier runs yourself, move the ledger away knowingly"
        )
    if unit == "user":
        regrouped = [e for e in spent if getattr(e, "user_grouping", None) != user_grouping]
        if regrouped:
            raise ValueError(
                f"the privacy ledger {path} holds {len(regrouped)} user-level stretch(es) over another "
                "grouping of these records into users (another data.user_field or other user ids): a "
                "user-level epsilon holds for one fixed set of users. Use the user_field of the earlier "
                "runs"
            )


class UserLevelMixin:
    """The user-level half of `secure_kd.dp.trainer.DPDistiller` (which mixes it in and provides
    `privacy`, `users`, `randomness`, `physical_batch_size`, `_collate`, `_policy_batch`,
    `_forward_backward`, `cfg`)."""

    @staticmethod
    def _user_groups(privacy, examples, user_of_example, train) -> UserGroups | None:
        if privacy.unit != "user":
            if user_of_example is not None:
                raise ValueError("user_of_example is given but train.privacy.unit is record")
            return None
        if user_of_example is None or len(user_of_example) != len(examples):
            raise ValueError(
                "train.privacy.unit: user needs one user per training example (user_of_example): set "
                "data.user_field"
            )
        limit = privacy.max_physical_batch_size
        if limit is not None and limit < privacy.max_records_per_user:
            raise ValueError(
                f"train.privacy.max_physical_batch_size {limit} is below max_records_per_user "
                f"{privacy.max_records_per_user}: a user's records are clipped together, so they must fit in "
                "one physical batch; raise max_physical_batch_size or lower max_records_per_user"
            )
        return UserGroups(user_of_example)

    @property
    def batches_per_epoch(self) -> int:
        """Steps per epoch: records / batch, or with unit: user, users / expected users per step."""
        users = getattr(self, "users", None)
        if users is None:
            return super().batches_per_epoch
        return max(1, -(-users.n_users // self.cfg.batch_size))

    def _user_step(self, private: PrivateStudent, step: int) -> tuple[float, int, int]:
        """One user-level step (`secure_kd.dp.user_level`): sampled users, whole users per physical batch,
        per-record gradients summed per user, then Opacus clips each user's sum and adds the noise."""
        users = sample_users(self.users.n_users, self.sample_rate, step, self.randomness)
        chosen = choose_records(self.users, users, self.privacy.max_records_per_user, step, self.randomness)
        batches = physical_user_batches(chosen, self.physical_batch_size)
        loss_sum, n_examples, tokens = 0.0, 0, 0
        if not batches:  # no user sampled: the step releases noise only
            private.prepare_empty_batch()
            private.optimizer.step()
            private.optimizer.zero_grad(set_to_none=True)
        for position, batch_users in enumerate(batches):
            indices = [i for records in batch_users for i in records]
            slots = torch.tensor([u for u, records in enumerate(batch_users) for _ in records])
            batch = self._policy_batch(self._collate(indices), step)
            losses = self._forward_backward(private, batch)
            per_user_grad_samples(private.optimizer, slots, len(batch_users))
            loss_sum += float(losses.sum())
            n_examples += len(indices)
            tokens += int((shift_labels(batch["labels"]) != -100).sum())
            private.optimizer.signal_skip_step(do_skip=position < len(batches) - 1)
            private.optimizer.step()  # clips each user's sum; noise and update after the last batch
            private.optimizer.zero_grad(set_to_none=True)
        return loss_sum, n_examples, tokens

    def _user_resume_fields(self) -> dict:
        if self.users is None:
            return {}
        return {"n_users": self.users.n_users, "user_grouping": self.user_grouping}

    def _user_entry_fields(self) -> dict:
        if self.users is None:
            return {}
        return {
            "unit": "user",
            "n_users": self.users.n_users,
            "max_records_per_user": self.privacy.max_records_per_user,
            "user_grouping": self.user_grouping,
        }


__all__ = [
    "UserGroups",
    "UserLevelMixin",
    "check_ledger_units",
    "choose_records",
    "per_user_grad_samples",
    "physical_user_batches",
    "sample_users",
    "unit_of",
]

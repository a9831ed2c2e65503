"""Which records a DP step trains on, and the secret randomness behind sampling and noise.

Privacy amplification by subsampling holds only if nobody can predict the batches, and the Gaussian
noise protects only if nobody can reproduce it: neither may come from the job's `seed`, which sits
in the config and in results.json. Both come from a 63-bit secret drawn from the OS once per run
(`secrets`), from which one generator per (purpose, step) is derived. The secret is stored only in
the run's checkpoints (so a resumed run draws exactly what an uninterrupted one would): treat
checkpoints as private. torch's generator is not a CSPRNG; see docs/privacy.md.

`step_loader` yields, for one optimizer step, the logical batch as lists of record indices:
Poisson sampling (Opacus' `UniformWithReplacementSampler`: each record independently with
probability `sample_rate`, the sampling that the accountants analyse) or, when Poisson sampling is
off, a slice of a secret per-epoch permutation. Opacus' `BatchMemoryManager` then splits it into
physical batches.
"""

from __future__ import annotations

import hashlib
import secrets

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader


class SecretRandomness:
    """Generators derived from a per-run secret: `generator("poisson", step)`, `generator("noise", step)`."""

    def __init__(self, secret: int | None = None) -> None:
        self.secret = int(secret) if secret is not None else secrets.randbits(63)

    def seed(self, purpose: str, index: int) -> int:
        digest = hashlib.sha256(f"{self.secret}:{purpose}:{index}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def generator(self, purpose: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed(purpose, index))


def _as_list(indices: list[int]) -> list[int]:
    return list(indices)


def step_loader(
    *,
    n_records: int,
    sample_rate: float,
    step: int,
    randomness: SecretRandomness,
    poisson: bool = True,
) -> DataLoader:
    """A DataLoader whose one batch is the logical batch of `step` (a list of record indices, maybe empty)."""
    if poisson:
        generator = randomness.generator("poisson", step)
        batch_sampler = UniformWithReplacementSampler(
            num_samples=n_records, sample_rate=sample_rate, generator=generator, steps=1
        )
    else:
        batch_size = max(1, round(sample_rate * n_records))
        per_epoch = -(-n_records // batch_size)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n_records, generator=randomness.generator("shuffle", epoch)).tolist()
        batch_sampler = [order[position * batch_size : (position + 1) * batch_size]]
    return DataLoader(range(n_records), batch_sampler=batch_sampler, collate_fn=_as_list)

"""Synthetic teacher logits with the shape of a real language model's, for tests and benchmarks.

A tiny random Llama gives nearly flat distributions, a poor proxy for what a trained teacher
puts in a cache. This generator mimics a trained LM over a BPE vocabulary, where frequent
tokens have low ids:

    logit_v = -a * log(1 + v) + sigma * eps_v              (Zipf-like prior on ids, plus noise)

then `n_candidates` plausible continuations (half drawn from the Zipf prior, half uniform over
the vocabulary) are lifted above the maximum: candidate j gets `max + s * d**j + 0.3 * eps`,
with the sharpness s ~ U(sharpness) and the decay d ~ U(decay) drawn per position. With the
defaults at vocab 49,152 the top-1 probability has mean ~0.52 (10th-90th percentile about
0.2-0.9), the entropy averages ~3.5 nats, and the top-64 hold ~78% of the mass; the benchmark
prints these statistics next to its results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_HASH_MODULUS = (1 << 61) - 1
_HASH_BASE = 1_000_003


@dataclass(frozen=True)
class SyntheticLogitShape:
    """Settings of the generator (see module docstring)."""

    zipf_exponent: float = 0.7
    noise_std: float = 1.8
    n_candidates: int = 12
    sharpness: tuple[float, float] = (1.0, 8.0)
    decay: tuple[float, float] = (0.3, 0.8)


class SyntheticLogitGenerator:
    """Draws synthetic logits for one vocabulary size (the Zipf prior is computed once)."""

    def __init__(self, vocab_size: int, shape: SyntheticLogitShape = SyntheticLogitShape()) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.shape = shape
        self.prior = -shape.zipf_exponent * torch.log1p(torch.arange(vocab_size, dtype=torch.float64))
        cdf = torch.cumsum(torch.softmax(self.prior, 0), 0)
        self._prior_cdf = (cdf / cdf[-1]).float()
        self.prior = self.prior.float()

    def sample(self, n_positions: int, generator: torch.Generator) -> torch.Tensor:
        """Logits [n_positions, vocab_size] (float32)."""
        if n_positions < 0:
            raise ValueError(f"n_positions must be >= 0, got {n_positions}")
        shape, n = self.shape, n_positions
        n_cand = min(shape.n_candidates, self.vocab_size)
        logits = self.prior + shape.noise_std * torch.randn(n, self.vocab_size, generator=generator)
        from_prior = torch.searchsorted(self._prior_cdf, torch.rand(n, n_cand, generator=generator))
        from_prior = from_prior.clamp_(max=self.vocab_size - 1)
        uniform = torch.randint(0, self.vocab_size, (n, n_cand), generator=generator)
        candidates = torch.where(torch.rand(n, n_cand, generator=generator) < 0.5, from_prior, uniform)
        low, high = shape.sharpness
        sharpness = low + (high - low) * torch.rand(n, 1, generator=generator)
        low, high = shape.decay
        decay = low + (high - low) * torch.rand(n, 1, generator=generator)
        lift = sharpness * decay ** torch.arange(n_cand, dtype=torch.float32)
        jitter = 0.3 * torch.randn(n, n_cand, generator=generator)
        logits.scatter_(1, candidates, logits.max(dim=1, keepdim=True).values + lift + jitter)
        return logits


def synthetic_logits(
    n_positions: int,
    vocab_size: int,
    *,
    generator: torch.Generator,
    shape: SyntheticLogitShape = SyntheticLogitShape(),
) -> torch.Tensor:
    """Logits [n_positions, vocab_size] (float32) with realistic, peaked next-token distributions."""
    return SyntheticLogitGenerator(vocab_size, shape).sample(n_positions, generator)


class SyntheticTeacher:
    """A callable with a causal LM's interface returning `synthetic_logits`.

    The logits at a position depend only on the seed and the tokens up to that position
    (a rolling hash of the prefix seeds the generator), so they do not depend on batching or
    padding, like a real causal LM's. Padded positions (attention_mask 0) get zeros.
    """

    def __init__(self, vocab_size: int, *, seed: int = 0, shape: SyntheticLogitShape = SyntheticLogitShape()):
        self.vocab_size = vocab_size
        self.seed = seed
        self.calls = 0
        self._generator = SyntheticLogitGenerator(vocab_size, shape)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        batch, seq = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = torch.zeros(batch, seq, self.vocab_size)
        generator = torch.Generator()
        for row in range(batch):
            prefix_hash = self.seed % _HASH_MODULUS
            for position in range(seq):
                prefix_hash = (prefix_hash * _HASH_BASE + int(input_ids[row, position]) + 1) % _HASH_MODULUS
                if mask[row, position]:
                    generator.manual_seed(prefix_hash)
                    logits[row, position] = self._generator.sample(1, generator)[0]
        return logits

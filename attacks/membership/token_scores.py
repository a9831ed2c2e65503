"""Per-token statistics of a causal LM on token sequences, from one forward pass per batch.

For every predicted position t of a sequence (tokens 1..n-1, each given the tokens before it), under
the model's next-token distribution p = softmax(logits_t):

- `logprob[t]` = log p(x_t), the log-probability of the actual token;
- `mu[t]` = sum_v p_v log p_v, the mean of log p under p (minus the entropy);
- `sigma2[t]` = sum_v p_v (log p_v)^2 - mu_t^2, the variance of log p under p.

That is everything the record-level attacks of `attacks.membership.reference_attacks` need: the loss
is -mean(logprob), Min-K% uses the lowest logprobs, Min-K%++ (Zhang et al. 2024) standardizes each
logprob by mu and sigma. The formulas are those of the Min-K%++ authors' code (float32, softmax over
the full vocabulary). Batches are formed from length-sorted sequences (less padding) and the vocabulary
statistics are computed in blocks of positions, so no [batch, seq, vocab] temporaries beyond the logits
themselves are kept; `benchmarks/mia_scoring.py` measures the cost against a plain forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Positions per block of vocabulary statistics. On a CPU the statistics are memory-bound: a block whose
# float32 logits fit in the core's L2 cache is read from memory once instead of once per elementwise pass
# (SmolLM2's 49,152-entry vocabulary: 5 positions per block, 4.4x faster than blocks of 512 on 2 Xeon
# cores, which took the scoring overhead over a plain forward from 1.16x to 1.04x). Accelerators keep
# long blocks (few kernel launches).
CPU_BLOCK_BYTES = 1 << 20
ACCELERATOR_BLOCK = 512


def position_block(vocab: int, device: torch.device) -> int:
    """Positions per block of `batch_stats` for a vocabulary of `vocab` entries on `device`."""
    if device.type != "cpu":
        return ACCELERATOR_BLOCK
    return max(1, CPU_BLOCK_BYTES // (4 * vocab))


@dataclass
class TokenStats:
    """Ragged per-token statistics of n sequences: sequence i owns positions offsets[i]:offsets[i+1]."""

    logprob: np.ndarray  # float32 [total positions]
    mu: np.ndarray
    sigma2: np.ndarray
    offsets: np.ndarray  # int64 [n + 1]
    n_forwards: int = 0  # model forward calls that produced these (0 when read from a cache)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.logprob[a:b], self.mu[a:b], self.sigma2[a:b]

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sums(self) -> np.ndarray:
        """Total log-probability of each sequence (float64 [n])."""
        return np.add.reduceat(self.logprob.astype(np.float64), self.offsets[:-1]) * (self.counts() > 0)

    def mean_nll(self) -> np.ndarray:
        """Mean next-token NLL (nats) of each sequence, float64 [n]."""
        return -self.sums() / np.maximum(self.counts(), 1)


def position_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(logprob, mu, sigma2), each [n], from `logits` [n, vocab] and the actual tokens `targets` [n]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = logp.gather(-1, targets[:, None].long()).squeeze(-1)
    p_logp = logp.exp().mul_(logp)
    mu = p_logp.sum(-1)
    second = p_logp.mul_(logp).sum(-1)
    return token, mu, (second - mu.square()).clamp_min_(0.0)


def batch_stats(logits: torch.Tensor, ids: torch.Tensor) -> tuple[np.ndarray, ...]:
    """(logprob, mu, sigma2) as float32 numpy [batch, seq]; position t predicts ids[:, t + 1] (the last
    position of each row and padding are computed and left for the caller to ignore). The logits are
    read as one flat [batch * seq, vocab] view in blocks of `position_block` positions, whatever the
    sequence length."""
    batch, width, vocab = logits.shape
    flat = logits.reshape(batch * width, vocab)
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    targets = targets.reshape(-1)
    out = [torch.empty(batch * width, dtype=torch.float32, device=logits.device) for _ in range(3)]
    block = position_block(vocab, logits.device)
    for a in range(0, batch * width, block):
        b = min(batch * width, a + block)
        for buffer, value in zip(out, position_stats(flat[a:b], targets[a:b]), strict=True):
            buffer[a:b] = value
    return tuple(v.reshape(batch, width).cpu().numpy() for v in out)


def batch_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), every index once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded int64 [batch, longest]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> TokenStats:
    """TokenStats of `model` on `sequences` (token ids, in order), one forward per batch.

    `on_batch(n_sequences_done_in_batch)` is called after each batch (for a progress bar). Sequences of
    fewer than 2 tokens have no predicted position and are refused."""
    if not sequences:
        raise ValueError("no sequences to score")
    short = [i for i, s in enumerate(sequences) if len(s) < 2]
    if short:
        raise ValueError(f"sequence {short[0]} has fewer than 2 tokens: nothing to predict (drop it)")
    model.eval()
    device = torch.device(device)
    counts = np.array([len(s) - 1 for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = {name: np.empty(int(offsets[-1]), dtype=np.float32) for name in ("logprob", "mu", "sigma2")}
    n_forwards = 0
    for batch in batch_order([len(s) for s in sequences], batch_size):
        ids, mask = pad_batch([sequences[i] for i in batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        n_forwards += 1
        values = batch_stats(logits, ids)
        for row, index in enumerate(batch):
            n, start = int(counts[index]), int(offsets[index])
            for name, value in zip(("logprob", "mu", "sigma2"), values, strict=True):
                out[name][start : start + n] = value[row, :n]
        del logits
        if on_batch is not None:
            on_batch(len(batch))
    return TokenStats(out["logprob"], out["mu"], out["sigma2"], offsets, n_forwards=n_forwards)

"""Record-level membership scores for any causal LM, from per-token statistics (higher = more likely member).

Inputs are `TokenStats` (`attacks.membership.token_scores`) of the target and of the user's reference
model(s) on the same records, plus the records' texts for zlib. Every attack reads the same cached
statistics; none needs another forward pass.

- `loss` (Yeom et al. 2018): -L(x), L the target's mean next-token NLL.
- `reference` (likelihood ratio; Carlini et al. 2021 "comparing to other models", the offline LiRA of
  Carlini et al. 2022 in its simplest form): -(L_target(x) - L_ref(x)), L_ref the mean over reference
  models. A record the target finds easier than a model that never saw it is evidence of training on
  it; templated records every model finds easy are calibrated away.
- `zlib` (Carlini et al. 2021): -L(x) / zlib(x), zlib(x) the zlib-compressed length in bytes of the
  scored text (as the Min-K% authors' code: `ll / len(zlib.compress(text))`).
- `min_k` (Min-K%, Shi et al. 2024): the mean of the lowest k% token log-probabilities.
- `min_k_plus_plus` (Min-K%++, Zhang et al. 2024): per token (log p(x_t) - mu_t) / sigma_t with mu_t,
  sigma_t^2 the mean and variance of log p under the model's own next-token distribution; the mean of
  the lowest k%. Both Min-K variants keep max(1, floor(k n)) of a record's n tokens.
- `rmia` (Zarifzadeh et al. 2024), offline with the user's references: p(x) = exp(-L(x)) and
  Pr(x) = (1 + a)/2 * mean_ref p_ref(x) + (1 - a)/2 (the paper's linear approximation of the missing
  IN models, parameter a); score(x) = the fraction of population records z with
  (p(x)/Pr(x)) / (p(z)/Pr(z)) >= gamma, computed by `attacks.membership.scores.rmia_scores`. The
  population is the known non-members, cross-fitted: records are split at random into two folds and a
  record of one fold is compared with the non-members of the other, so no record is its own z.
  The default a = 1 (Pr(x) = the references' mean probability): a language model's p(x) is small, and
  for a < 1 the constant (1 - a)/2 dominates Pr(x), which makes RMIA rank like the loss attack.

Losses may be per token (the reference shares the target's tokenizer) or per byte (another tokenizer:
total NLL of the record's bytes / their count, see `per_byte_nll`); `reference` and `rmia` then compare
per-byte losses.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from attacks.membership.scores import rmia_scores
from attacks.membership.token_scores import TokenStats

ATTACKS = ("loss", "reference", "zlib", "min_k", "min_k_plus_plus", "rmia")
_MIN_SIGMA = 1e-6


def zlib_bytes(text: str) -> int:
    """Length in bytes of zlib.compress(text as UTF-8) (default level, as the Min-K% code)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_scores(mean_nll: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    if len(texts) != len(mean_nll):
        raise ValueError(f"{len(texts)} texts for {len(mean_nll)} losses")
    return -np.asarray(mean_nll, np.float64) / np.array([max(zlib_bytes(t), 1) for t in texts], np.float64)


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    keep = max(1, int(len(values) * k))
    return float(np.sort(values)[:keep].mean())


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k (the fraction of tokens kept) must be in (0, 1], got {k}")


def min_k_scores(stats: TokenStats, k: float = 0.2) -> np.ndarray:
    _check_k(k)
    return np.array([_lowest_k_mean(stats.record(i)[0].astype(np.float64), k) for i in range(len(stats))])


def min_k_plus_plus_scores(stats: TokenStats, k: float = 0.2) -> np.ndarray:
    _check_k(k)
    out = np.empty(len(stats))
    for i in range(len(stats)):
        logprob, mu, sigma2 = (v.astype(np.float64) for v in stats.record(i))
        out[i] = _lowest_k_mean((logprob - mu) / np.maximum(np.sqrt(sigma2), _MIN_SIGMA), k)
    return out


def per_byte_nll(stats: TokenStats, n_bytes: Sequence[int]) -> np.ndarray:
    """Total NLL of each record / its number of UTF-8 bytes (nats per byte), float64 [n]."""
    n_bytes = np.asarray(n_bytes, np.float64)
    if n_bytes.shape != (len(stats),) or (n_bytes < 1).any():
        raise ValueError("n_bytes must give every record's (positive) byte count")
    return -stats.sums() / n_bytes


def reference_scores(target_nll: np.ndarray, reference_nll: np.ndarray) -> np.ndarray:
    """-(target loss - mean reference loss); `reference_nll` is [n] or [n, n_references]."""
    reference = np.asarray(reference_nll, np.float64)
    if reference.ndim == 1:
        reference = reference[:, None]
    return -(np.asarray(target_nll, np.float64) - reference.mean(axis=1))


def rmia_offline_scores(
    target_nll: np.ndarray,
    reference_nll: np.ndarray,
    is_member: np.ndarray,
    *,
    a: float = 1.0,
    gamma: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Offline RMIA with the non-members as population, two-fold cross-fitted (module docstring)."""
    target = np.asarray(target_nll, np.float64)
    reference = np.asarray(reference_nll, np.float64)
    if reference.ndim == 1:
        reference = reference[:, None]
    members = np.asarray(is_member, bool)
    folds = np.random.default_rng([seed, 0x5A1]).integers(0, 2, size=len(target))
    scores = np.empty(len(target))
    for fold in (0, 1):
        rows = folds == fold
        population = ~members & (folds != fold)
        if not rows.any():
            continue
        if not population.any():
            raise ValueError("RMIA needs non-members in both folds: give at least a few non-members")
        scores[rows] = rmia_scores(
            target[rows],
            reference[rows],
            np.zeros(reference[rows].shape, bool),
            target[population],
            reference[population],
            n_references=reference.shape[1],
            offline_a=a,
            gamma=gamma,
        )
    return scores


def all_scores(
    target: TokenStats,
    references: Sequence[TokenStats],
    texts: Sequence[str],
    is_member: np.ndarray,
    *,
    k: float = 0.2,
    rmia_a: float = 1.0,
    rmia_gamma: float = 1.0,
    seed: int = 0,
    target_bytes: Sequence[int] | None = None,
    reference_bytes: Sequence[Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Every attack of `ATTACKS` on the same records. With `target_bytes` (and one byte count list per
    reference), `reference` and `rmia` compare per-byte losses (the reference has another tokenizer)."""
    if not references:
        raise ValueError("the reference attacks need at least one reference model")
    for stats in references:
        if len(stats) != len(target):
            raise ValueError(f"a reference scored {len(stats)} records, the target {len(target)}")
    target_nll = target.mean_nll()
    if target_bytes is None:
        compare_target = target_nll
        compare_ref = np.stack([s.mean_nll() for s in references], axis=1)
    else:
        if reference_bytes is None or len(reference_bytes) != len(references):
            raise ValueError("per-byte comparison needs the byte counts of every reference's records")
        compare_target = per_byte_nll(target, target_bytes)
        compare_ref = np.stack(
            [per_byte_nll(s, b) for s, b in zip(references, reference_bytes, strict=True)], axis=1
        )
    return {
        "loss": -target_nll,
        "reference": reference_scores(compare_target, compare_ref),
        "zlib": zlib_scores(target_nll, texts),
        "min_k": min_k_scores(target, k),
        "min_k_plus_plus": min_k_plus_plus_scores(target, k),
        "rmia": rmia_offline_scores(
            compare_target, compare_ref, is_member, a=rmia_a, gamma=rmia_gamma, seed=seed
        ),
    }

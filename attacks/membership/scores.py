"""Membership-inference scores from per-example losses (higher score = more likely a member).

Inputs are mean next-token NLLs (nats) per example: of the target model, `[n]`, and of reference
(shadow) models, `[n, n_models]`, with `reference_in[i, j]` True when example i was in model j's
training set. For a language model the per-example "confidence" is p(x) = exp(-mean NLL), the
geometric mean of its tokens' probabilities (the analogue of a classifier's probability of the
true label).

- Loss attack (Yeom et al. 2018): score = -loss.
- LiRA (Carlini et al. 2022) on the logit-scaled confidence phi = log(p / (1 - p)):
  offline (OUT models only): a one-sided test against N(mu_out, sigma_out^2); the score is
  (phi - mu_out) / sigma_out, which orders examples exactly as the test's confidence
  Phi((phi - mu_out) / sigma_out) does without saturating at 1;
  online (IN and OUT models): log N(phi; mu_in, sigma_in^2) - log N(phi; mu_out, sigma_out^2).
  Per-example means; variances per example, or one global (pooled within-example) variance per
  side, which the paper recommends with few shadow models.
- RMIA (Zarifzadeh et al. 2024): LR(x, z) = (p(x|target) / Pr(x)) / (p(z|target) / Pr(z)) and
  score(x) = fraction of population samples z with LR(x, z) >= gamma.
  Pr(x) averages p(x|reference) over reference models: online, over k IN and k OUT models
  (their two means, averaged); offline, from k OUT models with the paper's linear
  approximation of the missing IN models, Pr_IN(x) ~ a Pr_OUT(x) + (1 - a), so
  Pr(x) = (1 + a)/2 Pr_OUT(x) + (1 - a)/2. Population samples are OUT for every reference
  model: Pr(z) is their mean over all reference models, with the same approximation offline.
  `tune_offline_a` picks `a` by attacking one reference model with the others (its membership is
  known), as in the authors' code.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from secure_kd import metrics

_MIN_SIGMA = 1e-6
_MIN_LOSS = 1e-12


def _losses(values, name: str, ndim: int | None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(
            f"{name} must be finite, non-negative NLLs (nats); found NaN, inf or a negative value"
        )
    return array


def _shadow_inputs(
    target_losses, reference_losses, reference_in
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    target = _losses(target_losses, "target_losses", 1)
    reference = _losses(reference_losses, "reference_losses", 2)
    membership = np.asarray(reference_in)
    if membership.dtype != bool:
        raise ValueError(
            f"reference_in must be a boolean matrix (True = trained on it), got dtype {membership.dtype}"
        )
    if reference.shape != membership.shape or reference.shape[0] != target.shape[0]:
        raise ValueError(
            f"reference_losses {reference.shape} and reference_in {membership.shape} must both be "
            f"[n_examples={target.shape[0]}, n_models]"
        )
    return target, reference, membership


def loss_attack_scores(losses) -> np.ndarray:
    return -_losses(losses, "losses", 1)


def logit_confidence(losses) -> np.ndarray:
    """phi = log(p / (1 - p)) with p = exp(-loss), computed without forming 1 - p."""
    loss = np.maximum(_losses(losses, "losses", None), _MIN_LOSS)
    return -loss - np.log(-np.expm1(-loss))


def _masked_mean_std(values: np.ndarray, mask: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    counts = mask.sum(axis=1)
    if (counts < 2).any():
        row = int(np.argmax(counts < 2))
        raise ValueError(
            f"example {row} has {int(counts[row])} {what} shadow model(s); LiRA needs at least 2 per example "
            "(use more shadow models: each example is IN for half of them)"
        )
    mean = np.where(mask, values, 0.0).sum(axis=1) / counts
    var = np.where(mask, (values - mean[:, None]) ** 2, 0.0).sum(axis=1) / (counts - 1)
    return mean, var


def lira_scores(
    target_losses, reference_losses, reference_in, *, online: bool, fixed_variance: bool
) -> np.ndarray:
    """LiRA scores (see the module docstring): offline uses OUT models only, online IN and OUT."""
    target, reference, membership = _shadow_inputs(target_losses, reference_losses, reference_in)
    phi_target, phi_reference = logit_confidence(target), logit_confidence(reference)
    mu_out, var_out = _masked_mean_std(phi_reference, ~membership, "OUT")
    if fixed_variance:
        var_out = np.full_like(var_out, var_out.mean())
    sigma_out = np.maximum(np.sqrt(var_out), _MIN_SIGMA)
    if not online:
        return (phi_target - mu_out) / sigma_out
    mu_in, var_in = _masked_mean_std(phi_reference, membership, "IN")
    if fixed_variance:
        var_in = np.full_like(var_in, var_in.mean())
    sigma_in = np.maximum(np.sqrt(var_in), _MIN_SIGMA)
    return stats.norm.logpdf(phi_target, mu_in, sigma_in) - stats.norm.logpdf(phi_target, mu_out, sigma_out)


def _first_k(values: np.ndarray, mask: np.ndarray, k: int, what: str) -> np.ndarray:
    """[n, k]: for every row, the values of the first k columns where `mask` is True."""
    counts = mask.sum(axis=1)
    if (counts < k).any():
        row = int(np.argmax(counts < k))
        raise ValueError(
            f"example {row} has only {int(counts[row])} {what} reference model(s) but n_references={k}; "
            "lower rmia.n_references or train more reference models"
        )
    columns = np.argsort(~mask, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(values, columns, axis=1)


def rmia_scores(
    target_losses,
    reference_losses,
    reference_in,
    population_target_losses,
    population_reference_losses,
    *,
    n_references: int,
    offline_a: float = 0.3,
    gamma: float = 1.0,
    online: bool = False,
) -> np.ndarray:
    """RMIA scores in [0, 1] (see the module docstring for the formula implemented)."""
    target, reference, membership = _shadow_inputs(target_losses, reference_losses, reference_in)
    z_target = _losses(population_target_losses, "population_target_losses", 1)
    z_reference = _losses(population_reference_losses, "population_reference_losses", 2)
    if z_reference.shape != (z_target.shape[0], reference.shape[1]):
        raise ValueError(
            f"population_reference_losses must be [n_population={z_target.shape[0]}, n_models="
            f"{reference.shape[1]}], got {z_reference.shape}"
        )
    if n_references < 1:
        raise ValueError(f"n_references must be >= 1, got {n_references}")
    if not 0.0 <= offline_a <= 1.0:
        raise ValueError(f"offline_a must be in [0, 1], got {offline_a}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")

    p_reference = np.exp(-reference)
    pr_out = _first_k(p_reference, ~membership, n_references, "OUT").mean(axis=1)
    pr_z = np.exp(-z_reference).mean(axis=1)
    if online:
        pr_x = 0.5 * (_first_k(p_reference, membership, n_references, "IN").mean(axis=1) + pr_out)
    else:
        pr_x = 0.5 * (1.0 + offline_a) * pr_out + 0.5 * (1.0 - offline_a)
        pr_z = 0.5 * (1.0 + offline_a) * pr_z + 0.5 * (1.0 - offline_a)
    ratio_x = np.exp(-target) / pr_x
    ratio_z = np.sort(np.exp(-z_target) / pr_z)
    # LR(x, z) >= gamma  <=>  ratio_z <= ratio_x / gamma
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / ratio_z.size


def tune_offline_a(
    reference_losses,
    reference_in,
    population_reference_losses,
    *,
    n_references: int,
    gamma: float = 1.0,
    grid: Sequence[float] = tuple(np.round(np.linspace(0.0, 1.0, 11), 2)),
    pseudo_target: int = 0,
) -> tuple[float, dict[float, float]]:
    """(best a, {a: AUC}): offline RMIA against reference model `pseudo_target`, using the others."""
    reference = _losses(reference_losses, "reference_losses", 2)
    membership = np.asarray(reference_in, dtype=bool)
    z_reference = _losses(population_reference_losses, "population_reference_losses", 2)
    if reference.shape[1] < 2:
        raise ValueError("tuning a needs at least 2 reference models (one plays the target)")
    others = [j for j in range(reference.shape[1]) if j != pseudo_target]
    is_member = membership[:, pseudo_target]
    if is_member.all() or not is_member.any():
        raise ValueError("the pseudo-target reference model must have both members and non-members")
    # An example OUT of the pseudo-target has one OUT model fewer among the others.
    k = min(n_references, int((~membership[:, others]).sum(axis=1).min()))
    if k < 1:
        raise ValueError(
            "some example has no OUT model besides the pseudo-target; tuning a needs >= 4 models"
        )
    aucs: dict[float, float] = {}
    for a in grid:
        scores = rmia_scores(
            reference[:, pseudo_target],
            reference[:, others],
            membership[:, others],
            z_reference[:, pseudo_target],
            z_reference[:, others],
            n_references=k,
            offline_a=float(a),
            gamma=gamma,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few examples: the low-FPR warning does not matter for AUC
            aucs[float(a)] = metrics.roc_metrics(scores, is_member)["auc"]
    best = max(aucs, key=lambda a: (aucs[a], -abs(a - 0.3)))
    return best, aucs

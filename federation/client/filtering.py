"""fed_distill with client-side filtering: per-position weights of one organization's soft labels.

The organization fits `federation.client.proxy_filter.ProxyFilter` on features of its own training records and
weighs each transfer record 1 when it falls within a cluster's radius, `floor_weight` otherwise
(`FilteringConfig`). Features are the mean of the student's input embeddings over a record's tokens:
in round 1 (a random embedding) that is a random projection of the record's bag of tokens, which keeps
distances between records (Johnson-Lindenstrauss); later rounds use what the student has learned.
Nothing here leaves the organization but the weights, and under CKKS those travel encrypted.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from federation.client.proxy_filter import ProxyFilter
from federation.config import FilteringConfig
from federation.soft_labels import SoftLabelLayout
from secure_kd.data import TokenizedExample


@torch.no_grad()
def record_features(model: nn.Module, examples: list[TokenizedExample]) -> np.ndarray:
    """[records, hidden]: the mean input embedding of each record's tokens."""
    table = model.get_input_embeddings().weight.detach().float().cpu()
    rows = [table[torch.tensor(e.input_ids, dtype=torch.long)].mean(dim=0) for e in examples]
    return torch.stack(rows).numpy().astype(np.float64)


def transfer_weights(
    model: nn.Module,
    own: list[TokenizedExample],
    transfer: list[TokenizedExample],
    layout: SoftLabelLayout,
    config: FilteringConfig,
    *,
    seed: int,
) -> tuple[np.ndarray, float]:
    """Weights per soft-label position ([n_positions]) and the share of transfer records kept."""
    own_features = record_features(model, own)
    distinct = len(np.unique(own_features, axis=0))
    proxy = ProxyFilter(
        min(config.n_clusters, distinct),
        config.density_ratio,
        radius_quantile=config.radius_quantile,
        seed=seed,
    ).fit(own_features)
    keep = proxy.keep_mask(record_features(model, transfer))
    per_record = np.where(keep, 1.0, config.floor_weight)
    weights = np.concatenate(
        [np.full(len(positions), w) for w, positions in zip(per_record, layout.positions, strict=True)]
    )
    return weights, float(keep.mean())


def ensemble_from_weighted_sum(flat_mean: np.ndarray, layout: SoftLabelLayout) -> np.ndarray:
    """Decrypted CKKS payload mean [P*W + P] (weighted labels, then weights) -> the ensemble [P, W].

    Every client encrypts with weight 1, so both halves are divided by the same client count, which
    cancels in the ratio."""
    n, width = layout.n_positions, layout.width
    labels = np.asarray(flat_mean[: n * width], dtype=np.float64).reshape(n, width)
    total = np.asarray(flat_mean[n * width : n * width + n], dtype=np.float64)
    if not np.all(total > 0):
        raise ValueError(
            "decrypted filtering weights must be positive: set transfer.filtering.floor_weight > 0"
        )
    ensemble = np.clip(labels / total[:, None], 0.0, None)
    return ensemble / ensemble.sum(axis=1, keepdims=True)

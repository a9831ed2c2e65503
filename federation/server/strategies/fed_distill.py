"""`FedDistillStrategy`: FedMD / FedDF. Clients send soft labels on the public transfer set in the shared
layout (`federation.soft_labels`), the server averages them (weighted by the clients' filtering weights
when the job filters) into the ensemble teacher, and the clients distil from it at the start of the next
round (and once more after the last one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import RecordDict

from federation.messages import (
    read_filtered_soft_labels,
    read_soft_labels,
)
from federation.server.aggregation import (
    mean_soft_labels,
    weighted_ensemble,
)
from federation.server.strategies.base import AggregatingStrategy

if TYPE_CHECKING:
    from federation.results import RoundRecord


class FedDistillStrategy(AggregatingStrategy):
    def setup(self) -> dict[str, Any]:
        layout = self.session.data.layout
        return {
            "transfer_positions": layout.n_positions,
            "index_k": layout.k,
            "index": layout.kind,
            "layout": layout.fingerprint,
        }

    @property
    def filtered(self) -> bool:
        return self.job.transfer.filtering is not None

    def payload_values(self) -> int:
        layout = self.session.data.layout
        return layout.n_positions * (layout.width + (1 if self.filtered else 0))

    def _read_plain(self, content: RecordDict) -> dict[str, np.ndarray]:
        layout = self.session.data.layout
        if self.filtered:
            labels, weights = read_filtered_soft_labels(content, layout)
            return {"soft-labels": labels, "filter-weights": weights}
        return {"soft-labels": read_soft_labels(content, layout)}

    def _combine_plain(self, payloads, metrics):
        labels = [p["soft-labels"] for p in payloads]
        if self.filtered:
            return {"soft-labels": weighted_ensemble(labels, [p["filter-weights"] for p in payloads])}
        return {"soft-labels": mean_soft_labels(labels)}

    def finish(self) -> RoundRecord:
        return self._final("train.digest")

"""`FedAvgStrategy`: weighted averaging of the students' trainable parameters (all weights, or only the LoRA
adapters of a peft student), in plaintext (weights are the number of examples, combined by the job's
aggregation rule, federation.server.strategies.robust) or under CKKS (clients send Enc(n_i w_i) and Enc(n_i);
the server adds; clients decrypt the mean).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import RecordDict
from safetensors.torch import save_file

from federation.messages import (
    NUM_EXAMPLES,
    read_arrays,
)
from federation.server.strategies.base import AggregatingStrategy
from federation.server.strategies.robust import robust_aggregate
from federation.students import build_student, flat_parameters

if TYPE_CHECKING:
    from federation.results import RoundRecord


class FedAvgStrategy(AggregatingStrategy):
    def setup(self) -> dict[str, Any]:
        model = build_student(self.job, 0, self.session.data)
        names, tensors = flat_parameters(model)
        self.spec = {n: (tuple(t.shape), "float32") for n, t in zip(names, tensors, strict=True)}
        self.n_values = sum(math.prod(shape) for shape, _ in self.spec.values())
        if not self.encrypted:
            self.plain = {n: t.float().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        return {"shared_parameters": self.n_values, "arrays": len(self.spec)}

    def payload_values(self) -> int:
        return self.n_values

    def _read_plain(self, content: RecordDict) -> dict[str, np.ndarray]:
        return read_arrays(content, self.spec)

    def _combine_plain(self, payloads, metrics):
        weights = [m[NUM_EXAMPLES] for m in metrics]
        return robust_aggregate(payloads, weights, self.plain, self.job.aggregation)

    def finish(self) -> RoundRecord:
        record = self._final("evaluate")
        if self.plain is not None:
            path = Path(self.job.out) / "global-student.safetensors"
            save_file(
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.plain.items()}, str(path)
            )
            record.aggregate["global_model"] = str(path)
        else:
            record.aggregate["global_model"] = "held by the organizations only (decrypted client-side)"
        return record

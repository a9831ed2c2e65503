"""`FedAvgStrategy`: weighted averaging of the students' trainable parameters (all weights, or only the LoRA
adapters of a peft student), in plaintext (weights are the number of examples, combined by the job's
aggregation rule, federation.server.strategies.robust) or under CKKS (clients send Enc(n_i w_i) and Enc(n_i);
the server adds; clients decrypt the mean).

With client-level DP (`client_dp`, federation.client_dp) every update weighs 1, each round is reserved in
the federation's ledger before it is sent (`stop_before`; federation.server.client_dp), and with
`noise: server` the plaintext mean is the clipped, noised one (`server_noised_mean`); with `noise: client`
the clients' shares are already in what arrives, so the server combines as usual.
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
from federation.server.client_dp import ClientDPAccount, server_noised_mean
from federation.server.strategies.base import AggregatingStrategy
from federation.server.strategies.robust import robust_aggregate
from federation.students import build_student, flat_parameters

if TYPE_CHECKING:
    from federation.results import RoundRecord


class FedAvgStrategy(AggregatingStrategy):
    dp: ClientDPAccount | None = None  # client-level DP's accounting, made in setup

    def setup(self) -> dict[str, Any]:
        model = build_student(self.job, 0, self.session.data)
        names, tensors = flat_parameters(model)
        self.spec = {n: (tuple(t.shape), "float32") for n, t in zip(names, tensors, strict=True)}
        self.n_values = sum(math.prod(shape) for shape, _ in self.spec.values())
        if not self.encrypted:
            self.plain = {n: t.float().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        info: dict[str, Any] = {"shared_parameters": self.n_values, "arrays": len(self.spec)}
        self.dp = ClientDPAccount(self.job, self.session.run_id) if self.job.client_dp is not None else None
        if self.dp is not None:
            report = self.dp.report()
            info["client_dp"] = {k: report[k] for k in ("noise", "noise_multiplier", "clip_norm", "delta")}
        return info

    def stop_before(self, r: int) -> str | None:
        return self.dp.reserve(r) if self.dp is not None else None

    def privacy_report(self) -> dict[str, Any] | None:
        return self.dp.report() if self.dp is not None else None

    def round(self, r: int) -> RoundRecord:
        return self._noted(super().round(r))

    def _noted(self, record: RoundRecord) -> RoundRecord:
        """A round's record with the federation's client-level epsilon after it."""
        if self.dp is not None:
            record.aggregate["client_dp_epsilon"] = self.dp.epsilon()
        return record

    def payload_values(self) -> int:
        return self.n_values

    def _read_plain(self, content: RecordDict) -> dict[str, np.ndarray]:
        return read_arrays(content, self.spec)

    def _combine_plain(self, payloads, metrics):
        dp = self.job.client_dp
        if dp is not None and dp.noise == "server":
            return server_noised_mean(payloads, self.plain, self.job)
        # under client_dp every update weighs 1, whatever num-examples says
        weights = [1.0] * len(payloads) if dp is not None else [m[NUM_EXAMPLES] for m in metrics]
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

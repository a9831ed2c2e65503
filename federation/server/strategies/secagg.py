"""fedavg under Flower's SecAgg+ (`protection: secagg+`): pairwise masking, no shared key, dropouts tolerated.

Each round runs Flower's own `SecAggPlusWorkflow` (setup, share keys, collect masked vectors, unmask)
over the same Grid; the clients answer through `secaggplus_mod` (federation/client/app.py), which quantizes
each update to `[-clipping_range, clipping_range]`, weights it by its number of examples (at most
`max_weight`), masks it, and clears the plaintext before the reply leaves. The server only learns the
weighted average. Because the updates are masked, the server cannot validate them one by one: a
malicious value is bounded by the clipping range, not rejected (docs/threat-model.md compares this with
CKKS). The workflow talks to the legacy Strategy API, so the round uses Flower's `LegacyContext` and a
legacy `FedAvg` whose metrics hook records who contributed.

Under client-level DP (`client_dp`, noise added by the clients) each client masks its update (weights -
global) plus its noise share with the same weight, so the unmasked result is the mean of the noised
updates and the new global model is the old one plus it; the server only ever sees that noised sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from federation.results import RoundRecord
from federation.server.strategies.fedavg import FedAvgStrategy

NOT_CONTRIBUTED = "did not complete the SecAgg+ protocol in this round (crashed, timed out or was dropped)"


class SecAggFedAvgStrategy(FedAvgStrategy):
    def setup(self) -> dict[str, Any]:
        info = super().setup()
        s, sa = self.session, self.job.secagg
        manager = SimpleClientManager()
        for node in s.nodes:
            manager.register(GridClientProxy(node_id=node, grid=s.grid, run_id=s.run_id))
        self.contributions: list[tuple[int, dict]] = []

        def collect(metrics: list[tuple[int, dict]]) -> dict:
            self.contributions = list(metrics)
            return {}

        legacy = LegacyFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=self.job.required_clients,
            min_available_clients=self.job.required_clients,
            accept_failures=True,
            fit_metrics_aggregation_fn=collect,
            on_fit_config_fn=lambda r: {"server-round": r},
        )
        base = Context(run_id=s.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.context = LegacyContext(
            base, config=ServerConfig(num_rounds=self.job.rounds), strategy=legacy, client_manager=manager
        )
        self.workflow = SecAggPlusWorkflow(
            sa.num_shares,
            sa.reconstruction_threshold,
            max_weight=sa.max_weight,
            clipping_range=sa.clipping_range,
            quantization_range=sa.quantization_range,
            timeout=self.job.round_timeout_s,
        )
        return {**info, "secagg": sa.model_dump(mode="json")}

    def round(self, r: int) -> RoundRecord:
        s = self.session
        names = list(self.spec)
        state = self.context.state
        parameters = ndarrays_to_parameters([self.plain[n] for n in names])
        state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            parameters, keep_input=True
        )
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: r})
        self.contributions = []
        self.workflow(s.grid, self.context)
        by_index = {int(m.get("org-index", -1)): m for _, m in self.contributions}
        metrics = {}
        for node in s.nodes:
            found = by_index.get(s.orgs[node].index)
            if found is None:
                s.drop(node, "secagg+", NOT_CONTRIBUTED)
            else:
                metrics[node] = {k: float(v) for k, v in found.items() if k != "org-index"}
        s.require(metrics, "secagg+", r)
        arrays = parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        )
        shapes = [shape for shape, _ in self.spec.values()]
        if [a.shape for a in arrays] != shapes or not all(np.all(np.isfinite(a)) for a in arrays):
            raise ValueError(
                "the SecAgg+ aggregate does not have the student's parameter shapes or is not finite"
            )
        if self.job.client_dp is not None:  # the mean of the noised updates
            arrays = [self.plain[n].astype(np.float64) + a for n, a in zip(names, arrays, strict=True)]
        self.plain = {n: a.astype(np.float32) for n, a in zip(names, arrays, strict=True)}
        aggregate = {
            "kind": "secagg+",
            "contributors": len(metrics),
            "note": "bytes of the SecAgg+ stages are not metered",
        }
        return self._noted(s.record(r, metrics, aggregate))

"""The server side of each mode, one strategy per module (as Flower's `serverapp/strategy/`): what goes out
in a round, what is accepted back, how it is combined.

- `fedavg.FedAvgStrategy`, `fed_distill.FedDistillStrategy`, `pate.PateStrategy`, `p2p.P2PStrategy`:
  one per `mode`; `secagg.SecAggFedAvgStrategy`: fedavg under `protection: secagg+`.
- `base`: the interface and the aggregating round; `robust`: the plaintext aggregation rules of fedavg.

`strategy_for(job)` is the one the ServerApp runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from federation.config import FederatedJob
from federation.server.strategies.base import Strategy
from federation.server.strategies.fed_distill import FedDistillStrategy
from federation.server.strategies.fedavg import FedAvgStrategy
from federation.server.strategies.p2p import P2PStrategy
from federation.server.strategies.pate import PateStrategy
from federation.server.strategies.secagg import SecAggFedAvgStrategy

if TYPE_CHECKING:
    from federation.server.session import Session

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvgStrategy,
    "fed_distill": FedDistillStrategy,
    "pate": PateStrategy,
    "p2p": P2PStrategy,
}


def strategy_for(job: FederatedJob) -> Callable[[Session], Strategy]:
    if job.protection == "secagg+":
        return SecAggFedAvgStrategy
    return STRATEGIES[job.mode]

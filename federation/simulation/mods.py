"""The ClientApp of the simulation: the honest one with the test roles' Flower mods installed.

    app = simulation_client_app(job)   # what `federation.run.run_federation` runs (`secure-kd federate`,
                                       # the attack and defense experiments)

`SIMULATION_MODS`: `fault_mod` (the job's `simulate_faults`, federation.simulation.faults) outside
`adversary_mod` (its `adversaries`, federation.simulation.adversary), so a fault corrupts what an
adversary crafted, as it would any payload. Each runs around one organization's handlers only when the
job gives that organization the role. The ClientApp that `flwr run` and deployed SuperNodes load
(`federation.client.app:app`) is built without them and refuses a job that gives one of its
organizations a role (`federation.client.guard`).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from federation.client.app import build_client_app
from federation.config import FederatedJob
from federation.simulation.adversary import adversary_mod
from federation.simulation.faults import fault_mod

SIMULATION_MODS = (fault_mod, adversary_mod)


def simulation_client_app(job: FederatedJob) -> ClientApp:
    """The ClientApp for `job` in simulation: `build_client_app(job)` with `SIMULATION_MODS`."""
    return build_client_app(job, mods=SIMULATION_MODS)

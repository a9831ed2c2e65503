"""The two points where the honest ClientApp lets a simulation change what an organization sends.

The handlers of the aggregating modes (`federation.client.rounds`) ask `current()` for this message's
hooks at two places, both before protection (CKKS encryption, SecAgg+ masking), where only the sender
can still change the plaintext:

- `fedavg_weights(ws, trained, start)`: the weights it sends; honest: the trained weights, clipped
  around the round's global model to `client_dp.clip_norm` (client-level DP with noise added by the
  clients; the noise share is added after this point, `federation.client.rounds`) or to
  `aggregation.client_clip_norm` when the job asks for it;
- `soft_labels(ws, labels)`: its soft labels on the transfer set (fed_distill); honest: as computed.

`HONEST` is the default of every message. Only a Flower mod of the simulation
(`federation.simulation.mods`) installs other hooks, for the duration of one message, and only the
simulation's ClientApp installs that mod: the ClientApp that `flwr run` and deployed SuperNodes load
(`federation.client.app:app`) has none, so there the honest hooks are the only ones. The handlers
never read the job's test roles (`adversaries`, `simulate_faults`) themselves.

Closures reach the ContextVar only through the module-level functions here (Ray pickles a ClientApp's
closures by value; a ContextVar cannot be pickled).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

import numpy as np

from federation.clipping import clip_update

if TYPE_CHECKING:
    from federation.client.workspace import OrgWorkspace
    from federation.config import FederatedJob


def client_clip_bound(job: FederatedJob) -> float | None:
    """The L2 bound an honest client clips its fedavg update to: client-level DP's C when the clients add
    the noise (with `noise: server` the server clips, as Flower's server-side fixed clipping), else
    `aggregation.client_clip_norm`."""
    dp = job.client_dp
    if dp is not None and dp.noise == "client":
        return dp.clip_norm
    return job.aggregation.client_clip_norm


class ClientHooks:
    """The honest organization."""

    def fedavg_weights(
        self, ws: OrgWorkspace, trained: dict[str, np.ndarray], start: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        bound = client_clip_bound(ws.job)
        return trained if bound is None else clip_update(trained, start, bound)

    def soft_labels(self, ws: OrgWorkspace, labels: np.ndarray) -> np.ndarray:
        return labels


HONEST = ClientHooks()
_CURRENT: ContextVar[ClientHooks] = ContextVar("secure_kd_client_hooks", default=HONEST)


def current() -> ClientHooks:
    return _CURRENT.get()


def install(hooks: ClientHooks) -> Token:
    """Use `hooks` until `remove(token)`: a mod calls both around `call_next`."""
    return _CURRENT.set(hooks)


def remove(token: Token) -> None:
    _CURRENT.reset(token)

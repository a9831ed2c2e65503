"""The server's side of the conversation with the organizations' ClientApps: `Session`.

Every exchange of the ServerApp (app.py) and of its strategies (strategies/) goes
through it: it drops a client that fails, times out or sends a message that fails validation, logs the
reason, and stops the run (`FederationFailed`) if fewer than `min_clients` organizations are left in a
round. Its own module, below the ServerApp and the strategies, so that neither imports the other to
name it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from federation.config import FederatedJob
from federation.crypto.he import PublicContext
from federation.failure_codes import parse_reason
from federation.job_data import JobData, job_data
from federation.messages import MessageRejected, check_size, content_bytes
from federation.results import ClientRound, Dropped, RoundRecord, summarize

logger = logging.getLogger("secure_kd.federation")
T = TypeVar("T")


class FederationFailed(RuntimeError):
    """The run cannot go on: too few organizations answered (the reasons are in results.json)."""


@dataclass(frozen=True)
class Org:
    index: int
    name: str
    node_id: int
    bundle: str


def short_reason(reason: str | None, limit: int = 300) -> str:
    """What a failed client said: secure-kd's code, stage (and a policy refusal's text) as they are;
    for anything else Flower made (a ClientApp process that died, an unreachable node), its first
    non-empty line without the engine's wrapping, never an empty string."""
    if parse_reason(reason) is not None:
        reason = str(reason)
    else:
        reason = str(reason or "")
        marker = "occurred. Message: "
        if marker in reason:
            reason = reason[reason.rindex(marker) + len(marker) :]
        lines = [line.strip(" '<>") for line in reason.splitlines() if line.strip(" '<>")]
        reason = lines[0] if lines else "no reason given"
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


class Session:
    """The server's side of the conversation with the organizations' ClientApps."""

    def __init__(self, grid: Grid, job: FederatedJob, run_id: int, data: JobData | None = None) -> None:
        self.grid, self.job, self.run_id = grid, job, run_id
        self.data = data if data is not None else job_data(job)
        self.orgs: dict[int, Org] = {}
        # org -> registered Flower node id (federation.deploy.node_binding); None: names not bound to nodes
        self.expected_nodes: dict[str, int] | None = None
        self.public: PublicContext | None = None
        self._drops: list[Dropped] = []
        self._bytes_up = self._bytes_down = 0
        self._round_started = time.perf_counter()

    @property
    def nodes(self) -> list[int]:
        return sorted(self.orgs, key=lambda node: self.orgs[node].index)

    def name(self, node: int) -> str:
        return self.orgs[node].name if node in self.orgs else f"node-{node}"

    def drop(self, node: int, stage: str, reason: str, client_reason: str | None = None) -> None:
        name = self.name(node)
        claimed = parse_reason(client_reason)
        if node not in self.orgs and claimed is not None and claimed[2]:
            name = claimed[2]  # before hello is accepted, the organization the client says it is
        logger.warning("dropped %s from %s: %s", name, stage, reason)
        self._drops.append(Dropped(org=name, stage=stage, reason=reason))

    def exchange(
        self,
        stage: str,
        message_type: str,
        contents: Mapping[int, RecordDict],
        round_index: int,
        read: Callable[[Org | None, RecordDict], T],
        *,
        timeout: float | None = None,
    ) -> dict[int, T]:
        """Send one message per node, wait up to the round timeout, keep the replies `read` accepts."""
        timeout = self.job.round_timeout_s if timeout is None else timeout
        messages = []
        for node, content in contents.items():
            self._bytes_down += content_bytes(content)
            messages.append(
                Message(
                    content, dst_node_id=node, message_type=message_type, group_id=f"{stage}-{round_index}"
                )
            )
        if not messages:
            return {}
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        accepted: dict[int, T] = {}
        answered: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in contents or node in answered:
                continue
            answered.add(node)
            if reply.has_error():
                self.drop(
                    node, stage, f"client failed: {short_reason(reply.error.reason)}", reply.error.reason
                )
                continue
            try:
                self._bytes_up += check_size(reply.content, self.job.max_message_bytes)
                accepted[node] = read(self.orgs.get(node), reply.content)
            except (MessageRejected, ValueError) as exc:
                self.drop(node, stage, f"message rejected: {exc}")
        for node in contents:
            if node not in answered:
                self.drop(node, stage, f"no reply within {timeout:g} s")
        return accepted

    def require(self, accepted: Mapping[int, Any], stage: str, round_index: int) -> None:
        needed = self.job.required_clients
        if len(accepted) < needed:
            reasons = "; ".join(f"{d.org}: {d.reason}" for d in self._drops[-10:])
            raise FederationFailed(
                f"round {round_index}, {stage}: {len(accepted)} organization(s) answered, min_clients is "
                f"{needed}; dropped: {reasons or 'none'}"
            )

    def record(
        self, round_index: int, metrics: Mapping[int, Mapping[str, float]], aggregate: dict
    ) -> RoundRecord:
        """Close the round: what each client reported, who was dropped and why, bytes and seconds."""
        clients = [
            ClientRound(org=self.name(node), metrics=dict(m))
            for node, m in sorted(
                metrics.items(), key=lambda item: self.orgs[item[0]].index if item[0] in self.orgs else -1
            )
        ]
        record = RoundRecord(
            round=round_index,
            seconds=time.perf_counter() - self._round_started,
            answered=[c.org for c in clients],
            dropped=self._drops,
            clients=clients,
            summary=summarize(clients),
            aggregate=aggregate,
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
        )
        self._drops, self._bytes_up, self._bytes_down = [], 0, 0
        self._round_started = time.perf_counter()
        return record

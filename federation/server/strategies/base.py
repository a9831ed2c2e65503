"""What every server strategy has in common: the `Strategy` interface (setup, payload size, rounds,
finish) and `AggregatingStrategy`, the round of fedavg and fed_distill (one payload per client, summed
under CKKS or combined in plaintext, then a final stage).

A strategy talks to the clients through the server `Session` (federation.server.session), which drops any
client that fails, times out or sends a message that does not pass `federation.messages`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from federation.messages import (
    ARRAYS,
    CONFIG,
    NUM_EXAMPLES,
    MessageRejected,
    read_ciphertext,
    read_metrics,
    to_array_record,
)
from federation.server.aggregation import (
    aggregate_encrypted,
)

if TYPE_CHECKING:
    from federation.results import RoundRecord
    from federation.server.session import Session


CLIENT_METRICS = (
    "handler-seconds",
    "train-loss",
    "heldout-loss",
    "test-loss",
    "epsilon",
    "delta",
    "seconds",
    "digest-loss",
    "loss-before",
    "loss-after",
    "kilobytes",
    "profile-epsilon",
    "kept-fraction",
    "heldout-bits-per-byte",
)


class Strategy(ABC):
    def __init__(self, session: Session) -> None:
        self.session = session
        self.job = session.job

    @property
    def encrypted(self) -> bool:
        return self.job.protection == "ckks"

    @abstractmethod
    def payload_values(self) -> int:
        """Values per client payload (the CKKS keyring is generated for this size)."""

    def setup(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def round(self, r: int) -> RoundRecord:
        """Run round `r` through the grid and return its record."""

    def finish(self) -> RoundRecord | None:
        return None

    def stop_before(self, r: int) -> str | None:
        """Why the run must not start round `r` (a privacy budget), or None to go on."""
        return None

    def privacy_report(self) -> dict[str, Any] | None:
        """The run's client-level DP accounting (results.json `client_dp`), if the strategy has one."""
        return None

    def _metrics(self, content: RecordDict, *, required: tuple[str, ...] = ()) -> dict[str, float]:
        return read_metrics(content, required, CLIENT_METRICS + (NUM_EXAMPLES,))


class AggregatingStrategy(Strategy):
    """Shared by fedavg and fed_distill: one payload per client per round, summed or averaged."""

    stage = "train"

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.plain: dict[str, np.ndarray] | None = None  # what the next round sends in plaintext
        self.encrypted_sum: bytes | None = None

    @abstractmethod
    def _read_plain(self, content: RecordDict) -> dict[str, np.ndarray]:
        """The validated plaintext payload of one client's reply."""

    @abstractmethod
    def _combine_plain(self, payloads: list[dict[str, np.ndarray]], metrics: list[dict[str, float]]):
        """Aggregate the plaintext payloads of one round."""

    def _content(self, r: int) -> RecordDict:
        config: dict[str, Any] = {"round": r, "layout": self.session.data.layout.fingerprint}
        if self.encrypted and self.encrypted_sum is not None:
            config["aggregate"] = self.encrypted_sum
        content = RecordDict({CONFIG: ConfigRecord(config)})
        if not self.encrypted and self.plain is not None:
            content[ARRAYS] = to_array_record(self.plain)
        return content

    def _read(self, org, content: RecordDict):
        required = () if self.encrypted else (NUM_EXAMPLES,)
        metrics = self._metrics(content, required=required)
        if self.encrypted:
            return read_ciphertext(content, self.session.public, self.payload_values()), metrics
        if metrics.get(NUM_EXAMPLES, 1) < 1:
            raise MessageRejected(f"num-examples must be >= 1, got {metrics[NUM_EXAMPLES]}")
        return self._read_plain(content), metrics

    def round(self, r: int) -> RoundRecord:
        s = self.session
        replies = s.exchange(self.stage, "train", {node: self._content(r) for node in s.nodes}, r, self._read)
        s.require(replies, self.stage, r)
        if self.encrypted:
            # in the organizations' order: the same sum, and the same blame, whoever answers first
            in_order = sorted(replies, key=lambda node: s.orgs[node].index)
            blob, rejected = aggregate_encrypted(s.public, {node: replies[node][0] for node in in_order})
            for node, reason in rejected.items():
                s.drop(node, "aggregate", reason)
                replies.pop(node)
            s.require(replies, "aggregate", r)
            self.encrypted_sum = blob
            aggregate = {"kind": "ckks-sum", "contributors": len(replies), "bytes": len(blob or b"")}
        else:
            nodes = list(replies)
            self.plain = self._combine_plain([replies[n][0] for n in nodes], [replies[n][1] for n in nodes])
            aggregate = {"kind": "plaintext", "contributors": len(replies)}
        return s.record(r, {node: m for node, (_, m) in replies.items()}, aggregate)

    def _final(self, message_type: str) -> RoundRecord:
        s = self.session
        r = self.job.rounds + 1
        replies = s.exchange(
            "final",
            message_type,
            {node: self._content(r) for node in s.nodes},
            r,
            lambda org, content: self._metrics(content),
        )
        s.require(replies, "final", r)  # a final stage nobody completed is a failed run, not a finished one
        return s.record(self.job.rounds, replies, {"stage": "after the last aggregation"})

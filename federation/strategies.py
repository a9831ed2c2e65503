"""The server side of each mode: what goes out in a round, what is accepted back, how it is combined.

- `FedAvgStrategy`: weighted averaging of the students' trainable parameters (all weights, or only the
  LoRA adapters of a peft student), in plaintext (weights are the number of examples) or under CKKS
  (clients send Enc(n_i w_i) and Enc(n_i); the server adds; clients decrypt the mean).
- `FedDistillStrategy`: FedMD / FedDF. Clients send soft labels on the public transfer set in the
  shared layout (`federation.soft_labels`), the server averages them into the ensemble teacher, the
  clients distil from it at the start of the next round (and once more after the last one).
- `PateStrategy`: every organization trains a teacher on its own records and votes for a token at
  every transfer position; the server releases GNMax labels, accounts for them, and trains the
  student on the released labels only.
- `P2PStrategy`: the server is a matchmaker (`federation.matchmaking`); paired peers exchange soft
  labels sealed end to end (`federation.crypto.keys`), which the server relays as opaque bytes.

A strategy talks to the clients through the server `Session` (session.py), which drops any client
that fails, times out or sends a message that does not pass `federation.messages`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors.torch import save_file

from federation.aggregation import (
    aggregate_encrypted,
    gnmax,
    gnmax_epsilon,
    mean_soft_labels,
    vote_counts,
    weighted_ensemble,
)
from federation.matchmaking import Matchmaker, RandomPairing, reward
from federation.messages import (
    ARRAYS,
    CONFIG,
    NUM_EXAMPLES,
    MessageRejected,
    read_arrays,
    read_ciphertext,
    read_config,
    read_filtered_soft_labels,
    read_metrics,
    read_soft_labels,
    read_votes,
    to_array_record,
)
from federation.profiles import PROFILE_DIM
from federation.robust import robust_aggregate
from federation.soft_labels import relabeled
from federation.students import build_student, flat_parameters, mean_loss, train_on_labels
from secure_kd.models import resolve_device

if TYPE_CHECKING:
    from federation.results import RoundRecord
    from federation.session import Session

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

    def _metrics(self, content: RecordDict, *, required: tuple[str, ...] = ()) -> dict[str, float]:
        return read_metrics(content, required, CLIENT_METRICS + (NUM_EXAMPLES,))


class _AggregatingStrategy(Strategy):
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


class FedAvgStrategy(_AggregatingStrategy):
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


class FedDistillStrategy(_AggregatingStrategy):
    def setup(self) -> dict[str, Any]:
        layout = self.session.data.layout
        return {"transfer_positions": layout.n_positions, "index_k": layout.k, "layout": layout.fingerprint}

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


class PateStrategy(Strategy):
    def __init__(self, session: Session, rng: np.random.Generator | None = None) -> None:
        super().__init__(session)
        self.rng = rng if rng is not None else np.random.default_rng()  # secret: never seeded from the config
        self.queries = 0

    def payload_values(self) -> int:
        return self.session.data.layout.n_positions

    def setup(self) -> dict[str, Any]:
        self.device = resolve_device(self.job.device)
        self.student = build_student(self.job, 0, self.session.data).to(self.device)
        return {"queries_per_round": self.payload_values(), "sigma": self.job.pate.sigma}

    def _read(self, org, content: RecordDict):
        data = self.session.data
        return read_votes(content, data.layout, data.vocab_size), self._metrics(content)

    def round(self, r: int) -> RoundRecord:
        s, data, pate = self.session, self.session.data, self.job.pate
        content = RecordDict({CONFIG: ConfigRecord({"round": r, "layout": data.layout.fingerprint})})
        replies = s.exchange("votes", "query.votes", {node: content for node in s.nodes}, r, self._read)
        s.require(replies, "votes", r)
        counts = vote_counts([v for v, _ in replies.values()], data.vocab_size)
        labels = gnmax(counts, pate.sigma, self.rng)
        self.queries += data.layout.n_positions
        epsilon, order = gnmax_epsilon(self.queries, pate.sigma, pate.delta)
        train = self.job.train.model_copy(update={"max_steps": pate.student_steps})
        out = Path(self.job.out) / "work" / f"pate-student-round-{r}"
        loss = train_on_labels(
            self.student,
            relabeled(data.transfer, data.layout, labels),
            train=train,
            kd=self.job.kd,
            pad_id=data.pad_id,
            eos_id=data.tokenizer.eos_token_id,
            out=out,
            seed=self.job.seed + r,
            device=self.device,
        )
        test_loss = mean_loss(
            self.student,
            data.test,
            pad_id=data.pad_id,
            limit=self.job.train.eval_batches,
            batch_size=self.job.train.batch_size,
            device=self.device,
        )
        aggregate = {
            "kind": "gnmax",
            "teachers": len(replies),
            "queries_total": self.queries,
            "epsilon": epsilon,
            "delta": pate.delta,
            "best_order": order,
            "agreement_with_plurality": float((labels == counts.argmax(axis=1)).mean()),
            "student_train_loss": loss,
            "student_test_loss": test_loss,
        }
        return s.record(r, {node: m for node, (_, m) in replies.items()}, aggregate)


class P2PStrategy(Strategy):
    def payload_values(self) -> int:
        return 0

    def setup(self) -> dict[str, Any]:
        p2p, n = self.job.p2p, self.job.n_organizations
        if p2p.policy == "linucb":
            self.policy = Matchmaker(n, alpha=p2p.alpha, schedule=p2p.schedule, beta0=p2p.beta0)
        else:
            self.policy = RandomPairing(n, seed=self.job.seed)
        return {"policy": p2p.policy, "profile_epsilon": p2p.profile_epsilon}

    def _read_profile(self, org, content: RecordDict):
        return read_arrays(content, {"profile": ((PROFILE_DIM,), "float64")})["profile"], self._metrics(
            content
        )

    def _read_sealed(self, org, content: RecordDict) -> bytes:
        sealed = read_config(content, "sealed", bytes)
        if not sealed:
            raise MessageRejected("empty sealed payload")
        return sealed

    def round(self, r: int) -> RoundRecord:
        s = self.session
        base = {"round": r, "layout": s.data.layout.fingerprint}
        profiles = s.exchange(
            "profile",
            "query.profile",
            {node: RecordDict({CONFIG: ConfigRecord(base)}) for node in s.nodes},
            r,
            self._read_profile,
        )
        s.require(profiles, "profile", r)
        matrix = np.zeros((self.job.n_organizations, PROFILE_DIM))
        for node, (profile, _) in profiles.items():
            matrix[s.orgs[node].index] = np.clip(profile, 0.0, 1.0)  # post-processing of a DP release
        available = sorted(s.orgs[node].index for node in profiles)
        pairs = self.policy.propose(matrix, available) if len(available) >= 2 else []
        node_of = {s.orgs[node].index: node for node in profiles}
        peer_of = {node_of[i]: node_of[j] for i, j in pairs} | {node_of[j]: node_of[i] for i, j in pairs}

        def instruction(node: int, **extra: Any) -> RecordDict:
            peer = s.orgs[peer_of[node]]
            return RecordDict(
                {CONFIG: ConfigRecord({**base, "peer": peer.name, "peer-bundle": peer.bundle, **extra})}
            )

        sealed = s.exchange(
            "p2p-send", "train.p2p_send", {node: instruction(node) for node in peer_of}, r, self._read_sealed
        )
        learners = {
            node: instruction(node, sealed=sealed[peer]) for node, peer in peer_of.items() if peer in sealed
        }
        for node in set(peer_of) - set(learners):
            s.drop(node, "p2p-learn", f"its peer {s.orgs[peer_of[node]].name} sent nothing to learn from")
        learned = s.exchange(
            "p2p-learn",
            "train.p2p_learn",
            learners,
            r,
            lambda org, content: self._metrics(content, required=("loss-before", "loss-after", "kilobytes")),
        )
        rewards = {}
        for i, j in pairs:
            got = [learned[node_of[k]] for k in (i, j) if node_of[k] in learned]
            if got:
                p2p = self.job.p2p
                value = float(
                    np.mean(
                        [
                            reward(m["loss-before"], m["loss-after"], m["kilobytes"], p2p.gamma, p2p.delta_kb)
                            for m in got
                        ]
                    )
                )
                self.policy.report((i, j), value)
                rewards[f"{s.orgs[node_of[i]].name}+{s.orgs[node_of[j]].name}"] = value
        aggregate = {
            "kind": "p2p-relay",
            "pairs": [[s.orgs[node_of[i]].name, s.orgs[node_of[j]].name] for i, j in pairs],
            "unpaired": [s.orgs[node_of[i]].name for i in self.policy.last_unpaired if i in node_of],
            "rewards": rewards,
            "mean_reward": float(np.mean(list(rewards.values()))) if rewards else None,
            "relayed_bytes": sum(len(b) for b in sealed.values()),
        }
        metrics = {node: {**profiles[node][1], **learned.get(node, {})} for node in profiles}
        return s.record(r, metrics, aggregate)


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvgStrategy,
    "fed_distill": FedDistillStrategy,
    "pate": PateStrategy,
    "p2p": P2PStrategy,
}

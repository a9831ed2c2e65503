"""`P2PStrategy`: the server is a matchmaker (`federation.matchmaking`); paired peers exchange soft labels
sealed end to end (`federation.crypto.keys`), which the server relays as opaque bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from federation.matchmaking import Matchmaker, RandomPairing, reward
from federation.messages import (
    CONFIG,
    MessageRejected,
    read_arrays,
    read_config,
)
from federation.profiles import PROFILE_DIM
from federation.server.strategies.base import Strategy

if TYPE_CHECKING:
    from federation.results import RoundRecord


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

"""`PateStrategy`: every organization trains a teacher on its own records and votes for a token at every
transfer position; the server releases GNMax labels (federation.server.aggregation), accounts for them,
and trains the student on the released labels only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from federation.messages import (
    CONFIG,
    read_votes,
)
from federation.server.aggregation import (
    gnmax,
    gnmax_epsilon,
    vote_counts,
)
from federation.server.strategies.base import Strategy
from federation.soft_labels import relabeled
from federation.students import build_student, mean_loss, train_on_labels
from secure_kd.models import resolve_device

if TYPE_CHECKING:
    from federation.results import RoundRecord
    from federation.server.session import Session


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
